"""Users: creating one (admin) and who the caller is."""

from fastapi import APIRouter

from app.api.deps import DbSession, Who, db_user
from app.api.schemas import ERRORS, UserIn
from quarkflow_core.database import begin_write
from quarkflow_core.users import admin_create_user

router = APIRouter()


@router.post("/api/v1/users", status_code=201, tags=["users"], responses=ERRORS)
def create_user(body: UserIn, who: Who, s: DbSession) -> dict:
    """Create a user (role admin)."""
    begin_write(s)  # SQLite: read-then-write takes the write lock first
    user = admin_create_user(
        session=s,
        actor=db_user(s, who),
        username=body.username,
        role=body.role,
        password=body.password,
    )
    return {"username": user.username, "role": user.role.value}


@router.get("/api/v1/whoami", tags=["users"], responses=ERRORS)
def whoami(who: Who) -> dict:
    return {"username": who.username, "role": who.role.value, "anonymous": who.user_id is None}

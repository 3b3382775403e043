"""What routes depend on: the service and settings :func:`app.api.create_app` was built with
(from ``app.state``, not closures), who is calling, a database session (the route's one
transaction), the project a route works in, and the checked X-Request-Id. Roles are checked
by the core, with ``quarkflow_core.users.authorize`` (the caller's ``Principal`` is an actor as
it is)."""

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Path, Request
from sqlalchemy.orm import Session

from quarkflow_core.config import Settings
from quarkflow_core.errors import (
    AuthenticationFailed,
    InvalidInput,
    NotFound,
    PermissionDenied,
    QuarkflowError,
)
from quarkflow_core.schema import DEFAULT_PROJECT, DEFAULT_PROJECT_ID, User
from quarkflow_core.service import ANONYMOUS, PredictionService, Principal


async def app_service(request: Request) -> PredictionService:
    return request.app.state.service


async def app_settings(request: Request) -> Settings:
    return request.app.state.settings


Service = Annotated[PredictionService, Depends(app_service)]
AppSettings = Annotated[Settings, Depends(app_settings)]


def principal(request: Request) -> Principal:
    """Who is calling: the bearer token's user, or the anonymous demo user where the app
    allows it (``app.state.anonymous``)."""
    return principal_from(
        request.headers.get("authorization"),
        service=request.app.state.service,
        anonymous=request.app.state.anonymous,
    )


def principal_from(header: str | None, *, service: PredictionService, anonymous: bool) -> Principal:
    """``principal`` for any transport that carries an ``authorization`` header (gRPC's
    metadata too, ``app/api/oip_grpc.py``)."""
    if header:
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthenticationFailed("use the header 'Authorization: Bearer <token>'")
        return service.authenticate(token.strip())
    if anonymous:
        return ANONYMOUS
    raise AuthenticationFailed(
        "authentication required: send 'Authorization: Bearer <token>' "
        "(create one with `quarkflow tokens create --user NAME`)"
    )


Who = Annotated[Principal, Depends(principal)]


def db_session(service: Service) -> Iterator[Session]:
    """The route's one transaction (``database.session_scope``): committed when the route
    returns, rolled back when it raises, closed before the response is sent."""
    with service.session() as session:
        yield session


DbSession = Annotated[Session, Depends(db_session, scope="function")]


def db_user(session: Session, who: Principal) -> User:
    """The caller's user row; anonymous callers and deleted users are refused."""
    if who.user_id is None:
        raise PermissionDenied("sign in: this action is not open to anonymous users")
    user = session.get(User, who.user_id)
    if user is None:
        raise AuthenticationFailed("the token's user no longer exists")
    return user


def request_id(request: Request) -> str | None:
    """X-Request-Id as the database can store it (checked before anything is accepted)."""
    rid = request.headers.get("x-request-id")
    if rid is not None and (len(rid) > 64 or not rid.isprintable()):
        raise InvalidInput(
            "header X-Request-Id: at most 64 printable characters", code="invalid_header"
        )
    return rid


# --------------------------------------------------------------------------- the project

ProjectName = Annotated[
    str,
    Path(
        max_length=64,
        pattern="^[A-Za-z0-9_.-]+$",
        description="project name (or id)",
        examples=["default"],
    ),
]


def project_path(project: ProjectName) -> str:
    """Declares (and checks) the ``{project}`` path parameter of the project-scoped routers
    mounted under ``/api/v1/projects/{project}``; :func:`current_project` resolves it."""
    return project


@dataclass(frozen=True)
class ProjectRef:
    """The project a route works in, detached from any database session."""

    id: int
    name: str


DEFAULT_REF = ProjectRef(DEFAULT_PROJECT_ID, DEFAULT_PROJECT)


def current_project(request: Request, service: Service) -> ProjectRef:
    """The ``{project}`` path parameter, resolved (name or id); the default project when the
    route is mounted at ``/api/v1`` (no database read then). An unknown project is NotFound,
    naming the projects."""
    ref = request.path_params.get("project")
    if ref is None:
        return DEFAULT_REF
    # the projects the service serves, as of its last listing: no database call, so a
    # project's predictions keep working while the database is down, as the default's do
    for name, pid in service.project_names().items():
        if ref in (name, str(pid)):
            return ProjectRef(pid, name)
    from quarkflow_core.projects import get_project

    try:
        with service.session() as s:  # a project created since; short, the route may not need it
            row = get_project(session=s, ref=ref)
            return ProjectRef(row.id, row.name)
    except NotFound:
        try:  # the other projects' names only to a caller who may see them
            principal(request)
        except QuarkflowError:
            raise NotFound(f"no project {ref!r}") from None
        raise


CurrentProject = Annotated[ProjectRef, Depends(current_project)]

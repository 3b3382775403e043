"""Projects: the installation's model lines (any signed-in user reads them), creating one and
granting a user a role in one (admin). Not project-scoped itself: it names the project."""

from fastapi import APIRouter

from app.api.deps import DbSession, ProjectName, Who, db_user
from app.api.schemas import ERRORS, GrantIn, ProjectIn, Username
from quarkflow_core import projects
from quarkflow_core.database import begin_write

router = APIRouter()


def signed_in(s: DbSession, who: Who) -> None:
    """Reading projects needs a user (not the anonymous demo caller)."""
    db_user(s, who)


@router.get("/api/v1/projects", tags=["projects"], responses=ERRORS)
def list_projects(who: Who, s: DbSession) -> dict:
    """Every project: name, title, task type, classes."""
    signed_in(s, who)
    return {"projects": [projects.project_dict(p) for p in projects.list_projects(session=s)]}


@router.post("/api/v1/projects", status_code=201, tags=["projects"], responses=ERRORS)
def create_project(body: ProjectIn, who: Who, s: DbSession) -> dict:
    """Create an empty project (role admin); audited `projects.create`."""
    begin_write(s)  # SQLite: read-then-write takes the write lock first
    row = projects.admin_create(
        session=s,
        actor=db_user(s, who),
        name=body.name,
        classes=body.classes,
        task_type=body.task_type,
        title=body.title,
    )
    return projects.project_dict(row)


@router.get("/api/v1/projects/{project}", tags=["projects"], responses=ERRORS)
def get_project(project: ProjectName, who: Who, s: DbSession) -> dict:
    """One project, with its per-project role grants."""
    signed_in(s, who)
    row = projects.get_project(session=s, ref=project)
    return {**projects.project_dict(row), "grants": projects.grants(session=s, project_id=row.id)}


@router.put("/api/v1/projects/{project}/grants/{username}", tags=["projects"], responses=ERRORS)
def grant_role(
    project: ProjectName, username: Username, body: GrantIn, who: Who, s: DbSession
) -> dict:
    """Give a user a role in this project in place of their own (role admin); audited
    `projects.grant`."""
    begin_write(s)
    actor = db_user(s, who)
    return projects.admin_grant(
        session=s, actor=actor, project=project, username=username, role=body.role
    )


@router.delete("/api/v1/projects/{project}/grants/{username}", tags=["projects"], responses=ERRORS)
def revoke_role(project: ProjectName, username: Username, who: Who, s: DbSession) -> dict:
    """Take a user's grant in this project away: their own role applies there again (role
    admin); audited `projects.revoke`."""
    begin_write(s)
    actor = db_user(s, who)
    return projects.admin_grant(
        session=s, actor=actor, project=project, username=username, role=None
    )

"""Projects: one installation, several model lines.

A project has a name (used in paths: ``/api/v1/projects/<name>/...``, ``--project NAME``), a
task type (``classification``; the next task type plugs in at ``schema.TaskType``), its class
list, policy overrides, and its Label Studio project. Its images, predictions, review queue,
dataset snapshots, training runs, model versions, aliases and promotion events carry its id;
every core function that reads or writes them takes ``project_id`` (default: the default
project, id 1, which holds an installation's data from before projects).

Permissions: a user's installation-wide role applies in every project unless a grant gives
them another role in one project (``grant``); an admin is admin everywhere. ``role_in`` is the
rule; ``users.authorize(..., project_id=...)`` applies it.

Transactions: nothing here commits; the edge (API route, CLI command, page) does.
"""

from __future__ import annotations

import re
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from quarkflow_core.errors import AlreadyExists, InvalidInput, NotFound
from quarkflow_core.schema import (
    DEFAULT_PROJECT,
    DEFAULT_PROJECT_ID,
    Project,
    ProjectGrant,
    Role,
    TaskType,
    User,
    parse_enum,
)

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,29}$")  # 30: fits Label Studio's titles
MAX_CLASSES = 1000

__all__ = [
    "DEFAULT_PROJECT",
    "DEFAULT_PROJECT_ID",
    "NAME_RE",
    "check_classes",
    "check_same_classes",
    "create_project",
    "ensure_classes",
    "get_project",
    "grant",
    "grants",
    "list_projects",
    "project_dict",
    "revoke",
    "role_in",
]


def check_name(name: str) -> str:
    name = (name or "").strip()
    if not NAME_RE.match(name) or name.isdigit():  # digits alone are a project id in paths
        raise InvalidInput(
            f"project name {name!r}: 1 to 30 of a-z, 0-9 and '-', starting with a letter or "
            "digit, not digits alone",
            code="invalid_project_name",
        )
    return name


def check_classes(classes: list[str]) -> list[str]:
    """At least two distinct, non-empty, printable labels of at most 128 characters."""
    out = [str(c).strip() for c in classes]
    if len(out) < 2 or len(out) > MAX_CLASSES:
        raise InvalidInput(f"a project needs 2 to {MAX_CLASSES} classes; got {len(out)}")
    bad = [c for c in out if not c or len(c) > 128 or not c.isprintable()]
    if bad:
        raise InvalidInput(f"class names must be 1 to 128 printable characters: {bad[:5]}")
    if len(set(out)) != len(out):
        raise InvalidInput("class names must be distinct")
    return out


def get_project(*, session: Session, ref: str | int | None = None) -> Project:
    """A project by name or id; ``None`` is the default project. NotFound names the others."""
    if ref is None or ref == "":
        ref = DEFAULT_PROJECT_ID
    if isinstance(ref, int) or (isinstance(ref, str) and ref.isdigit()):
        row = session.get(Project, int(ref))
    else:
        row = session.scalar(select(Project).where(Project.name == ref))
    if row is None:
        names = ", ".join(p.name for p in list_projects(session=session)) or "none"
        raise NotFound(f"no project {ref!r}; projects: {names}")
    return row


def list_projects(*, session: Session) -> list[Project]:
    return list(session.scalars(select(Project).order_by(Project.id)))


def create_project(
    *,
    session: Session,
    name: str,
    classes: list[str],
    task_type: str | TaskType = TaskType.CLASSIFICATION,
    title: str | None = None,
    policy: dict[str, Any] | None = None,
    created_by: str | None = None,
) -> Project:
    """A new, empty project (no images, versions or champion yet). The caller authorizes
    (``projects.create`` needs admin) and commits."""
    name = check_name(name)
    kind = parse_enum(TaskType, task_type, "task type")
    if session.scalar(select(Project.id).where(Project.name == name)) is not None:
        raise AlreadyExists(f"project {name!r} already exists")
    row = Project(
        name=name,
        title=(title or "").strip()[:128] or None,
        task_type=kind,
        classes=check_classes(classes),
        policy=dict(policy or {}),
        created_by=created_by,
    )
    session.add(row)
    session.flush()
    return row


def is_detection(*, session: Session, project_id: int) -> bool:
    """Whether the project's models find boxes (task type ``detection``)."""
    row = session.get(Project, project_id)
    return row is not None and row.task_type == TaskType.DETECTION


def check_same_classes(*, session: Session, project_id: int, classes: list[str], what: str) -> None:
    """Refuse ``what`` (a model version, a seed data set) whose class list is not the project's:
    a project's predictions, verdicts and labels all speak its classes. A project with no
    class list yet takes the first one it gets (``ensure_classes``)."""
    row = get_project(session=session, ref=project_id)
    if row.classes and set(row.classes) != {str(c) for c in classes}:
        raise InvalidInput(
            f"{what} has the classes {sorted(map(str, classes))[:12]}, project {row.name!r} "
            f"has {sorted(row.classes)[:12]}: use a project with these classes "
            "(`quarkflow projects create NAME --classes ...`)",
            code="wrong_classes",
        )


def ensure_classes(*, session: Session, project_id: int, classes: list[str]) -> None:
    """A project created without a class list (the default project of an empty installation)
    takes the first registered version's classes."""
    row = session.get(Project, project_id)
    if row is not None and not row.classes:
        row.classes = list(classes)


def project_dict(row: Project) -> dict[str, Any]:
    return {
        "id": row.id,
        "name": row.name,
        "title": row.title,
        "task_type": row.task_type.value,
        "classes": list(row.classes or []),
        "policy": dict(row.policy or {}),
        "labelstudio_project_id": row.labelstudio_project_id,
        "created_by": row.created_by,
        "created_at": row.created_at.isoformat() if row.created_at else None,
    }


# --------------------------------------------------------------------------- permissions


def role_in(*, session: Session, project_id: int | None, user_id: int | None, role: Role) -> Role:
    """The role that counts in a project: admin everywhere, else the user's grant in that
    project, else their installation-wide ``role``."""
    role = Role(role)
    if role == Role.ADMIN or project_id is None or user_id is None:
        return role
    granted = session.get(ProjectGrant, (project_id, user_id))
    return granted.role if granted is not None else role


def grants(*, session: Session, project_id: int) -> list[dict[str, Any]]:
    rows = session.execute(
        select(ProjectGrant, User.username)
        .join(User, User.id == ProjectGrant.user_id)
        .where(ProjectGrant.project_id == project_id)
        .order_by(User.username)
    )
    return [
        {
            "username": username,
            "role": g.role.value,
            "granted_by": g.granted_by,
            "created_at": g.created_at.isoformat(),
        }
        for g, username in rows
    ]


def grant(
    *, session: Session, project_id: int, user: User, role: str | Role, granted_by: str | None
) -> ProjectGrant:
    """Give ``user`` ``role`` in one project (replacing an earlier grant). The caller
    authorizes (``projects.grant`` needs admin), audits and commits."""
    role = parse_enum(Role, role, "role")
    row = session.get(ProjectGrant, (project_id, user.id))
    if row is None:
        row = ProjectGrant(project_id=project_id, user_id=user.id, role=role, granted_by=granted_by)
        session.add(row)
    else:
        row.role, row.granted_by = role, granted_by
    session.flush()
    return row


def revoke(*, session: Session, project_id: int, user: User) -> bool:
    row = session.get(ProjectGrant, (project_id, user.id))
    if row is None:
        return False
    session.delete(row)
    session.flush()
    return True


# --------------------------------------------------------------------------- administration
# Checked with ``users.authorize`` and audited "ok" in the caller's transaction (the edge
# commits), the same from the API and the CLI. ``users`` imports this module (``role_in``),
# so it is imported inside these functions.


def admin_create(
    *,
    session: Session,
    actor: Any,
    name: str,
    classes: list[str],
    task_type: str | TaskType = TaskType.CLASSIFICATION,
    title: str | None = None,
) -> Project:
    """``projects.create``: an installation admin creates an empty project."""
    from quarkflow_core.users import authorize, record_audit

    authorize(session, actor=actor, allowed={Role.ADMIN}, action="projects.create")
    row = create_project(
        session=session,
        name=name,
        classes=classes,
        task_type=task_type,
        title=title,
        created_by=actor.username,
    )
    record_audit(
        session=session,
        actor=actor,
        action="projects.create",
        outcome="ok",
        target_type="project",
        target_id=row.name,
        detail={"project_id": row.id, "classes": list(row.classes)},
    )
    return row


AUDITED = ("project", "role", "revoked")  # what a grant's audit row keeps


def admin_grant(
    *, session: Session, actor: Any, project: str | int, username: str, role: str | Role | None
) -> dict[str, Any]:
    """``projects.grant`` (``role``) or ``projects.revoke`` (``role=None``): an admin of the
    installation, or of this project, sets or removes a user's role in it."""
    from quarkflow_core.users import authorize, get_user, record_audit

    action = "projects.grant" if role else "projects.revoke"
    row = get_project(session=session, ref=project)
    authorize(session, actor=actor, allowed={Role.ADMIN}, action=action, project_id=row.id)
    user = get_user(session=session, username=username)
    out: dict[str, Any] = {"project": row.name, "username": user.username}
    if role:
        out["role"] = grant(
            session=session, project_id=row.id, user=user, role=role, granted_by=actor.username
        ).role.value
    else:
        out["revoked"] = revoke(session=session, project_id=row.id, user=user)
        out["own_role"] = user.role.value
    record_audit(
        session=session,
        actor=actor,
        action=action,
        outcome="ok",
        target_type="user",
        target_id=user.username,
        detail={"project_id": row.id, **{k: out[k] for k in out if k in AUDITED}},
    )
    return out

"""Users, roles, API tokens, the audit log, and the one authorization check.

Who acts is an ``Actor``: a ``User`` row (CLI ``--user``, workbench, flows), the API's
``service.Principal`` (the bearer token's user), or the ``Operator`` at the command line (the
bootstrap path: users and tokens). ``authorize`` is the only place a role is checked for an
action: admin may do everything; a refusal is written to ``audit_log`` (outcome ``denied``) in
its own committed transaction and raises ``PermissionDenied``. A privileged action that goes
ahead writes its ``ok`` row with ``record_audit`` under the same action name, in the action's
own transaction, so the row commits or rolls back with what it records. ``can`` is the same
rule without the side effects, for UI decisions only (show a form, hide a button)."""

from __future__ import annotations

import getpass
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from quarkflow_core.database import begin_write
from quarkflow_core.errors import (
    AlreadyExists,
    AuthenticationFailed,
    InvalidInput,
    NotFound,
    PermissionDenied,
)
from quarkflow_core.projects import role_in
from quarkflow_core.schema import ApiToken, AuditLog, Role, User, parse_enum, utcnow
from quarkflow_core.security import hash_password, hash_token, new_token, verify_password

USERNAME_RE = re.compile(r"^[A-Za-z0-9_.@-]{2,64}$")


def parse_role(value: str | Role) -> Role:
    return parse_enum(Role, value, "role")


class Actor(Protocol):
    """Who acts, as the audit log records it: a ``User``, the API's ``Principal`` or the
    ``Operator``."""

    @property
    def id(self) -> int | None: ...
    @property
    def username(self) -> str: ...
    @property
    def role(self) -> Role: ...


@dataclass(frozen=True)
class Operator:
    """Whoever runs ``quarkflow`` with the database's credentials: the bootstrap path that
    creates the first admin and issues tokens. It could write the rows itself, so it holds the
    admin role; it is audited with no user id, as ``cli:<login>``."""

    login: str
    id: None = None
    role: Role = Role.ADMIN

    @property
    def username(self) -> str:
        return f"cli:{self.login}"[:64]

    @classmethod
    def current(cls) -> Operator:
        """The operator running this process (the login name of the OS user)."""
        return cls(getpass.getuser())


def create_user(
    *,
    session: Session,
    username: str,
    role: str | Role,
    password: str | None = None,
    display_name: str | None = None,
) -> User:
    if not USERNAME_RE.match(username or ""):
        raise InvalidInput(f"invalid username {username!r}: 2-64 letters, digits or . _ @ -")
    if session.scalar(select(User).where(User.username == username)):
        raise AlreadyExists(f"user {username!r} already exists")
    if password is not None and len(password) < 8:
        raise InvalidInput("password too short: at least 8 characters")
    user = User(
        username=username,
        role=parse_role(role),
        display_name=display_name,
        password_hash=hash_password(password) if password else None,
    )
    session.add(user)
    session.flush()
    return user


def get_user(*, session: Session, username: str) -> User:
    user = session.scalar(select(User).where(User.username == username))
    if user is None:
        raise NotFound(f"no user named {username!r}")
    return user


def ensure_user(*, session: Session, username: str, role: str | Role, **kwargs: Any) -> User:
    """Get-or-create (used by seeding and the demo bootstrap)."""
    user = session.scalar(select(User).where(User.username == username))
    return user or create_user(session=session, username=username, role=role, **kwargs)


def authenticate_password(*, session: Session, username: str, password: str) -> User:
    user = session.scalar(select(User).where(User.username == username))
    if user is None or not user.is_active or not verify_password(password, user.password_hash):
        raise AuthenticationFailed("wrong username or password")
    return user


def create_token(
    *,
    session: Session,
    user: User,
    secret: str,
    name: str = "default",
    expires_in: timedelta | None = None,
) -> tuple[ApiToken, str]:
    """Returns the row and the plaintext token, which is shown once and never stored."""
    plaintext = new_token()
    token = ApiToken(
        user_id=user.id,
        name=name,
        prefix=plaintext[:10],
        token_hash=hash_token(plaintext, secret),
        expires_at=(utcnow() + expires_in) if expires_in else None,
    )
    session.add(token)
    session.flush()
    return token, plaintext


def authenticate_token(
    *, session: Session, token: str, secret: str, now: datetime | None = None, touch: bool = True
) -> User:
    """The user of a valid token (not revoked, not expired, user active); ``touch`` records
    ``last_used_at`` (a write: the API does it separately, at most once a minute)."""
    row = session.scalar(select(ApiToken).where(ApiToken.token_hash == hash_token(token, secret)))
    now = now or utcnow()
    if row is None or row.revoked_at is not None:
        raise AuthenticationFailed("unknown or revoked API token")
    if row.expires_at is not None and row.expires_at <= now:
        raise AuthenticationFailed("API token expired")
    if not row.user.is_active:
        raise AuthenticationFailed(f"user {row.user.username!r} is deactivated")
    if touch:
        row.last_used_at = now
    return row.user


def touch_token(*, session: Session, token_hash: str, now: datetime | None = None) -> None:
    """Record that a token was used (one UPDATE)."""
    stamp = now or utcnow()
    session.execute(
        update(ApiToken).where(ApiToken.token_hash == token_hash).values(last_used_at=stamp)
    )


def revoke_token(*, session: Session, token_id: int) -> None:
    row = session.get(ApiToken, token_id)
    if row is None:
        raise NotFound(f"no API token with id {token_id}")
    row.revoked_at = utcnow()


def record_audit(
    *,
    session: Session,
    actor: Actor | None,
    action: str,
    outcome: str,
    target_type: str | None = None,
    target_id: str | int | None = None,
    detail: dict[str, Any] | None = None,
) -> AuditLog:
    """One audit row in the session's transaction (``actor`` None: the system itself)."""
    row = AuditLog(
        actor_id=None if actor is None else actor.id,
        actor=None if actor is None else actor.username,
        action=action,
        outcome=outcome,
        target_type=target_type,
        target_id=None if target_id is None else str(target_id),
        detail=detail or {},
    )
    session.add(row)
    session.flush()
    return row


# --------------------------------------------------------------------------- authorization


def _roles(allowed: Iterable[Role | str]) -> frozenset[Role]:
    return frozenset(parse_role(r) for r in allowed)


def can(role: Role | str | None, allowed: Iterable[Role | str]) -> bool:
    """Whether ``role`` may do what the ``allowed`` roles may (admin may do everything).

    Pure: for UI decisions such as showing a form. A refusal goes through ``authorize``."""
    if role is None:
        return False
    role = parse_role(role)
    return role == Role.ADMIN or role in _roles(allowed)


@dataclass(frozen=True)
class _Who:
    """The actor's audit fields, read before the caller's transaction ends."""

    id: int | None
    username: str
    role: Role


def authorize(
    session: Session,
    *,
    actor: Actor,
    allowed: Iterable[Role | str],
    action: str,
    what: str | None = None,
    target_type: str | None = None,
    target_id: str | int | None = None,
    project_id: int | None = None,
) -> None:
    """The one authorization check: return if ``actor``'s role is allowed (admin always is);
    otherwise audit the refusal and raise ``PermissionDenied``. In a project (``project_id``)
    the role that counts is ``projects.role_in``: a grant there, else the actor's own.

    Call it before the action writes anything. The refusal (outcome ``denied``, the actor,
    ``detail`` = their role and the allowed roles) must outlive the caller's rollback, so it is
    committed here, in a transaction of its own that takes SQLite's write lock first
    (``database.begin_write``); the caller's transaction is committed before it. ``what``
    names the action for people ("reading the review queue"; default: ``action``)."""
    roles = _roles(allowed)
    role = role_in(session=session, project_id=project_id, user_id=actor.id, role=actor.role)
    if can(role, roles):
        return
    who = _Who(actor.id, actor.username, role)
    names = sorted(r.value for r in roles)
    detail: dict[str, Any] = {"role": who.role.value, "allowed": names}
    if project_id is not None:
        detail["project_id"] = project_id
    session.commit()
    begin_write(session)
    record_audit(
        session=session,
        actor=who,
        action=action,
        outcome="denied",
        target_type=target_type,
        target_id=target_id,
        detail=detail,
    )
    session.commit()
    raise PermissionDenied(
        f"{what or action} needs role {' or '.join(names)}; {who.username} is {who.role.value}"
    )


# --------------------------------------------------------------------------- privileged actions
# Checked with ``authorize`` and audited "ok" in the caller's transaction (the edge commits).


def admin_create_user(
    *,
    session: Session,
    actor: Actor,
    username: str,
    role: str | Role,
    password: str | None = None,
    display_name: str | None = None,
) -> User:
    """``users.create``: an admin (or the ``Operator``) creates a user."""
    authorize(session, actor=actor, allowed={Role.ADMIN}, action="users.create")
    user = create_user(
        session=session,
        username=username,
        role=role,
        password=password,
        display_name=display_name,
    )
    record_audit(
        session=session,
        actor=actor,
        action="users.create",
        outcome="ok",
        target_type="user",
        target_id=user.username,
        detail={"role": user.role.value},
    )
    return user


def admin_create_token(
    *,
    session: Session,
    actor: Actor,
    username: str,
    secret: str,
    name: str = "default",
    expires_in: timedelta | None = None,
) -> tuple[ApiToken, str]:
    """``tokens.create``: an admin (or the ``Operator``) issues a token for ``username``."""
    authorize(session, actor=actor, allowed={Role.ADMIN}, action="tokens.create")
    owner = get_user(session=session, username=username)
    token, plaintext = create_token(
        session=session, user=owner, secret=secret, name=name, expires_in=expires_in
    )
    record_audit(
        session=session,
        actor=actor,
        action="tokens.create",
        outcome="ok",
        target_type="api_token",
        target_id=token.id,
        detail={"user": owner.username, "name": name, "prefix": token.prefix},
    )
    return token, plaintext


def admin_revoke_token(*, session: Session, actor: Actor, token_id: int) -> None:
    """``tokens.revoke``: an admin (or the ``Operator``) revokes a token."""
    authorize(session, actor=actor, allowed={Role.ADMIN}, action="tokens.revoke")
    revoke_token(session=session, token_id=token_id)
    record_audit(
        session=session,
        actor=actor,
        action="tokens.revoke",
        outcome="ok",
        target_type="api_token",
        target_id=token_id,
    )

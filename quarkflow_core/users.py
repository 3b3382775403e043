"""Users, roles, API tokens and the audit log."""

from __future__ import annotations

import re
from datetime import datetime, timedelta
from typing import Any

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
from quarkflow_core.schema import ApiToken, AuditLog, Role, User, parse_enum, utcnow
from quarkflow_core.security import hash_password, hash_token, new_token, verify_password

USERNAME_RE = re.compile(r"^[A-Za-z0-9_.@-]{2,64}$")


def parse_role(value: str | Role) -> Role:
    return parse_enum(Role, value, "role")


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
    actor: User | None,
    action: str,
    outcome: str,
    target_type: str | None = None,
    target_id: str | int | None = None,
    detail: dict[str, Any] | None = None,
) -> AuditLog:
    row = AuditLog(
        actor_id=actor.id if actor else None,
        actor=actor.username if actor else None,
        action=action,
        outcome=outcome,
        target_type=target_type,
        target_id=None if target_id is None else str(target_id),
        detail=detail or {},
    )
    session.add(row)
    session.flush()
    return row


def require_role(*, session: Session, user: User, allowed: set[Role], action: str) -> None:
    """Refuse (and audit the refusal) unless the user's role is allowed; admin always is."""
    if user.role in allowed or user.role == Role.ADMIN:
        return
    # The refusal must outlive the caller's rollback: it is written in its own transaction,
    # which takes the write lock first (see database.begin_write).
    session.commit()
    begin_write(session)
    record_audit(
        session=session,
        actor=user,
        action=action,
        outcome="denied",
        detail={"role": user.role.value, "allowed": sorted(r.value for r in allowed)},
    )
    session.commit()
    allowed_txt = " or ".join(sorted(r.value for r in allowed))
    raise PermissionDenied(
        f"{action} needs role {allowed_txt}; {user.username} is {user.role.value}"
    )

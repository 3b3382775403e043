"""Token and password checks for the service: every request asks the database, so a revoked
or expired token stops at once; a token seen in the last minute keeps working only while the
database is unreachable; ``last_used_at`` is written at most once a minute per token."""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractContextManager

from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from quarkflow_core.config import Settings
from quarkflow_core.database import begin_write
from quarkflow_core.errors import AuthenticationFailed, DatabaseUnavailable
from quarkflow_core.security import hash_token
from quarkflow_core.service.principal import Principal
from quarkflow_core.users import (
    authenticate_password,
    authenticate_token,
    get_user,
    touch_token,
)

TOKEN_CACHE_S = 60.0  # a token seen this recently still works while the database is down
TOKEN_TOUCH_S = 60.0  # last_used_at is recorded at most this often per token


class TokenCheck:
    """Who a bearer token or a sign-in is, through one session factory."""

    def __init__(
        self, settings: Settings, session: Callable[[], AbstractContextManager[Session]]
    ) -> None:
        self.settings = settings
        self._session = session
        self._tokens: dict[str, tuple[Principal, float, float]] = {}  # seen, touched

    def authenticate(self, token: str) -> Principal:
        secret = self.settings.secret_key.get_secret_value()
        key = hash_token(token, secret)
        cached = self._tokens.get(key)
        try:  # every request asks the database: a revoked or expired token stops at once
            with self._session() as s:
                user = authenticate_token(session=s, token=token, secret=secret, touch=False)
                principal = Principal(user.id, user.username, user.role)
        except AuthenticationFailed:
            self._tokens.pop(key, None)
            raise
        except (OperationalError, DatabaseUnavailable):
            if cached and time.monotonic() - cached[1] < TOKEN_CACHE_S:
                return cached[0]  # the database is down: a token seen recently still works
            raise DatabaseUnavailable(
                "the database is unreachable and this token has not been seen recently"
            ) from None
        now = time.monotonic()
        if cached is None or now - cached[2] >= TOKEN_TOUCH_S:
            touched = self._touch(key)
        else:
            touched = cached[2]
        self._tokens[key] = (principal, now, touched if touched else now)
        return principal

    def _touch(self, token_hash: str) -> float | None:
        """Record last_used_at (at most once a minute per token; best effort: a busy or
        unreachable database does not fail the request)."""
        try:
            with self._session() as s:
                begin_write(s)
                touch_token(session=s, token_hash=token_hash)
            return time.monotonic()
        except (OperationalError, DatabaseUnavailable):
            return None

    def principal_for(self, username: str) -> Principal:
        """A signed-in UI user (Gradio / Streamlit) as a Principal."""
        with self._session() as s:
            user = get_user(session=s, username=username)
            if not user.is_active:
                raise AuthenticationFailed(f"user {username!r} is deactivated")
            return Principal(user.id, user.username, user.role)

    def check_password(self, username: str, password: str) -> bool:
        try:
            with self._session() as s:
                authenticate_password(session=s, username=username, password=password)
            return True
        except AuthenticationFailed:
            return False

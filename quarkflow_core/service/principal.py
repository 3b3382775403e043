"""Who is calling the prediction service, detached from any database session."""

from __future__ import annotations

from dataclasses import dataclass

from quarkflow_core.schema import Role


@dataclass(frozen=True)
class Principal:
    """Who is calling, detached from any database session. An ``users.Actor``: pass it to
    ``users.authorize`` (the one role check) as it is."""

    user_id: int | None
    username: str
    role: Role

    @property
    def id(self) -> int | None:
        """The user's id, as the audit log records it (None: the anonymous demo user)."""
        return self.user_id


ANONYMOUS = Principal(None, "anonymous", Role.DOMAIN_EXPERT)

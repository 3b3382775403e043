"""Replaying or discarding dead letters: the operator actions behind ``quarkflow outbox
replay|discard``. Either is a privileged action: ml_lead (or admin) in every project the
letters belong to, audited in the database's
append-only audit_log before the outbox file changes."""

from __future__ import annotations

from typing import TYPE_CHECKING

from sqlalchemy.orm import Session

from quarkflow_core.database import begin_write
from quarkflow_core.errors import InvalidInput, NotFound
from quarkflow_core.schema import DEFAULT_PROJECT_ID, Role, User
from quarkflow_core.users import authorize, record_audit

if TYPE_CHECKING:
    from quarkflow_core.outbox.store import DeadLetter, Outbox


def _audited(
    session: Session, *, user: User, action: str, letters: list[DeadLetter], detail: dict
) -> None:
    # the role that counts in each project the letters belong to (records carry their project)
    for project_id in sorted({d.payload.get("project_id", DEFAULT_PROJECT_ID) for d in letters}):
        authorize(session, actor=user, allowed={Role.ML_LEAD}, action=action, project_id=project_id)
    begin_write(session)
    for d in letters:
        record_audit(
            session=session,
            actor=user,
            action=action,
            outcome="ok",
            target_type=f"outbox_{d.kind}",
            target_id=d.key,
            detail={"record": d.id, "error": (d.error or "")[:500], **detail},
        )
    session.commit()


def replay_dead_letters(
    *, session: Session, outbox: Outbox, user: User, ids: list[int] | None
) -> list[int]:
    """Send dead letters (all when ``ids`` is None) back to the flusher, audited."""
    letters = outbox.dead(ids, limit=None)
    if ids is not None:
        missing = sorted(set(ids) - {d.id for d in letters})
        if missing:
            raise NotFound(f"no dead letter with id {', '.join(map(str, missing))}")
    if not letters:
        return []
    _audited(session, user=user, action="outbox.replay", letters=letters, detail={})
    return outbox.replay([d.id for d in letters])


def discard_dead_letters(
    *, session: Session, outbox: Outbox, user: User, ids: list[int], reason: str
) -> list[DeadLetter]:
    """Give up on dead letters for good, with a reason: audited, and kept in ``discarded``."""
    reason = reason.strip()
    if len(reason) < 10:
        raise InvalidInput("say why in at least 10 characters (--reason)")
    if not ids:
        raise InvalidInput("name the dead letters to discard (ids from `quarkflow outbox list`)")
    letters = outbox.dead(ids)
    missing = sorted(set(ids) - {d.id for d in letters})
    if missing:
        raise NotFound(f"no dead letter with id {', '.join(map(str, missing))}")
    _audited(
        session, user=user, action="outbox.discard", letters=letters, detail={"reason": reason}
    )
    return outbox.discard(ids, reason=reason, actor=user.username)

"""The promotion event log, written and read.

Written: every registry write runs under ``_lock`` (an advisory lock on Postgres, the database
write lock on SQLite); an alias moves with ``_set_alias`` and the move is recorded by ``_event``,
an append-only row carrying the evidence and its sha256 (``evidence_sha256``).
``set_challenger`` is the one alias move that needs no decision (flows and
``register_version`` make a new candidate the challenger); the decisions that move
``champion`` are in ``promotion``.

Read: ``history`` (oldest first), ``champion_at`` a point in time, ``event_dict`` for the edges,
``verify_event`` to check that stored evidence still hashes to what was recorded.

Aliases and events belong to a project (``project_id``, default: the default project): each
project has its own ``champion`` and ``challenger`` and its own history. The lock is one for
the installation.

``_lock`` commits the caller's transaction and ``set_challenger`` commits its move: registry
writes commit by design (see ``quarkflow_core.database``)."""

from __future__ import annotations

import hashlib
import json
from datetime import datetime
from typing import Any

from sqlalchemy import select, text
from sqlalchemy.orm import Session

from quarkflow_core.database import begin_write
from quarkflow_core.registry.lookups import CHALLENGER, CHAMPION, alias_of, in_project, summary
from quarkflow_core.schema import (
    DEFAULT_PROJECT_ID,
    ModelAlias,
    ModelVersion,
    PromotionAction,
    PromotionEvent,
    User,
    json_safe,
    utcnow,
)

_PG_LOCK_KEY = 0x51F10A  # pg_advisory_xact_lock key for registry writes


# --------------------------------------------------------------------------- writing


def _lock(session: Session) -> None:
    """Serialise registry writes. Ends the caller's transaction first: on SQLite the write lock
    must be the first statement of a transaction to be taken on a fresh snapshot."""
    session.commit()
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_LOCK_KEY})
    else:
        begin_write(session)


def evidence_sha256(evidence: dict[str, Any]) -> str:
    text_ = json.dumps(evidence, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text_.encode()).hexdigest()


def _set_alias(session: Session, alias: str, row: ModelVersion, actor: str) -> None:
    """Point the version's project's ``alias`` at it."""
    current = session.get(ModelAlias, (row.project_id, alias), populate_existing=True)
    if current is None:
        session.add(
            ModelAlias(project_id=row.project_id, alias=alias, version_id=row.id, updated_by=actor)
        )
    else:
        current.version_id = row.id
        current.updated_by = actor
        current.updated_at = utcnow()
    session.flush()


def _event(
    session: Session,
    *,
    project_id: int,
    action: PromotionAction,
    alias: str,
    from_id: int | None,
    to: ModelVersion | None,
    user: User | None,
    actor: str,
    reason: str,
    evidence: dict[str, Any],
    policy_verdict: str | None = None,
) -> PromotionEvent:
    evidence = json_safe(evidence)
    event = PromotionEvent(
        project_id=project_id,
        action=action,
        alias=alias,
        from_version_id=from_id,
        to_version_id=to.id if to else None,
        actor_id=user.id if user else None,
        actor=actor,
        reason=reason,
        policy_verdict=policy_verdict,
        evidence=evidence,
        evidence_sha256=evidence_sha256(evidence),
    )
    session.add(event)
    session.flush()
    return event


def set_challenger(
    *,
    session: Session,
    version: ModelVersion,
    actor: str,
    reason: str = "set as challenger",
    project_id: int = DEFAULT_PROJECT_ID,
) -> PromotionEvent | None:
    """Point the project's ``challenger`` at a version of it (flows do this after registering
    a candidate)."""
    in_project(version, project_id)
    _lock(session)
    current = alias_of(session=session, alias=CHALLENGER, project_id=project_id)
    champ = alias_of(session=session, alias=CHAMPION, project_id=project_id)
    if (current and current.id == version.id) or (champ and champ.id == version.id):
        session.commit()
        return None
    _set_alias(session, CHALLENGER, version, actor)
    event = _event(
        session,
        project_id=project_id,
        action=PromotionAction.SET_CHALLENGER,
        alias=CHALLENGER,
        from_id=current.id if current else None,
        to=version,
        user=None,
        actor=actor,
        reason=reason,
        evidence={"candidate": summary(version, session=session)},
    )
    session.commit()
    return event


# --------------------------------------------------------------------------- reading


def history(
    *, session: Session, alias: str | None = None, project_id: int = DEFAULT_PROJECT_ID
) -> list[PromotionEvent]:
    """Every promotion event of the project (optionally for one alias), oldest first."""
    q = (
        select(PromotionEvent)
        .where(PromotionEvent.project_id == project_id)
        .order_by(PromotionEvent.created_at, PromotionEvent.id)
    )
    if alias is not None:
        q = q.where(PromotionEvent.alias == alias)
    return list(session.scalars(q))


def champion_at(
    *, session: Session, when: datetime, project_id: int = DEFAULT_PROJECT_ID
) -> ModelVersion | None:
    """The project's champion at time ``when`` (None before its first approval)."""
    event = session.scalar(
        select(PromotionEvent)
        .where(
            PromotionEvent.project_id == project_id,
            PromotionEvent.alias == CHAMPION,
            PromotionEvent.to_version_id.is_not(None),
            PromotionEvent.created_at <= when,
        )
        .order_by(PromotionEvent.created_at.desc(), PromotionEvent.id.desc())
        .limit(1)
    )
    return None if event is None else session.get(ModelVersion, event.to_version_id)


def event_dict(*, session: Session, event: PromotionEvent) -> dict[str, Any]:
    def number(vid: int | None) -> int | None:
        return None if vid is None else session.get(ModelVersion, vid).version

    return {
        "id": event.id,
        "at": event.created_at.isoformat(),
        "action": event.action.value,
        "alias": event.alias,
        "from_version": number(event.from_version_id),
        "to_version": number(event.to_version_id),
        "actor": event.actor,
        "reason": event.reason,
        "policy_verdict": event.policy_verdict,
        "evidence_sha256": event.evidence_sha256,
    }


def verify_event(event: PromotionEvent) -> bool:
    """True when the stored evidence still hashes to the recorded sha256."""
    return evidence_sha256(event.evidence) == event.evidence_sha256

"""Decisions: approve, reject, roll back.

The policy only advises. Moving ``champion`` needs a user with role ``ml_lead`` and a reason;
overriding a failing policy needs ``override=True`` and a longer, written reason. Every file of
the target is checked against its sha256 first. The alias move, the append-only promotion event
(with the evidence and its sha256) and the audit row are written in one transaction under the
registry lock (``_move_champion``). The decision records which champion it was made against; if
another lead moved the champion meanwhile the second decision is refused with ``Conflict``
rather than silently overwriting it. A refused decision is audited too (``_refuse``), and so is
a refusal by role (``users.authorize``, with the role that counts in the project).

Every decision is within one project (``project_id``, default: the default project): its
champion, its challenger, its versions and its history; another project's version is not
found. Audit rows name the project (``detail["project_id"]``).

These functions commit by design (see ``quarkflow_core.database``): the lock needs a fresh
transaction, so the caller's is committed first, and the decision is committed here with its
event and audit row. Call them last in a unit of work."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import delete
from sqlalchemy.orm import Session

from quarkflow_core.database import begin_write
from quarkflow_core.errors import Conflict, InvalidInput
from quarkflow_core.ml.artifacts import ArtifactIntegrityError
from quarkflow_core.registry.events import _event, _lock, _set_alias, history
from quarkflow_core.registry.lookups import CHALLENGER, CHAMPION, alias_of, get_version, summary
from quarkflow_core.registry.policy import PolicyConfig, Proposal, propose
from quarkflow_core.registry.versions import verify_stored
from quarkflow_core.schema import (
    DEFAULT_PROJECT_ID,
    ModelAlias,
    ModelVersion,
    PromotionAction,
    PromotionEvent,
    Role,
    User,
)
from quarkflow_core.storage import Storage
from quarkflow_core.users import authorize, record_audit

MIN_REASON = 3
MIN_OVERRIDE_REASON = 20


def _check_reason(reason: str | None, *, minimum: int = MIN_REASON, why: str = "") -> str:
    reason = (reason or "").strip()
    if len(reason) < minimum:
        raise InvalidInput(f"a reason of at least {minimum} characters is required{why}")
    return reason


def _refuse(session: Session, user: User, action: str, target: ModelVersion, why: str) -> None:
    """Record a refused decision in the audit log; it outlives the caller's rollback."""
    target_no, project_id = target.version, target.project_id
    session.rollback()
    begin_write(session)
    record_audit(
        session=session,
        actor=user,
        action=action,
        outcome="refused",
        target_type="model_version",
        target_id=target_no,
        detail={"why": why, "project_id": project_id},
    )
    session.commit()


def _move_champion(
    session: Session,
    *,
    action: PromotionAction,
    target: ModelVersion,
    expected_from: ModelVersion | None,
    user: User,
    reason: str,
    evidence: dict[str, Any],
    policy_verdict: str | None,
) -> PromotionEvent:
    """The one transaction: lock, check nobody moved the champion, move it, record event +
    audit, commit."""
    expected_id = expected_from.id if expected_from else None
    expected_no = expected_from.version if expected_from else None
    target_id, target_no, project_id = target.id, target.version, target.project_id
    _lock(session)
    current = session.get(ModelAlias, (project_id, CHAMPION), populate_existing=True)
    current_id = current.version_id if current else None
    if current_id != expected_id:
        now = session.get(ModelVersion, current_id).version if current_id else None
        session.rollback()
        why = (
            f"the champion changed while this decision was being made (judged against "
            f"v{expected_no}, now v{now}); review the new comparison and decide again"
        )
        _refuse(session, user, f"models.{action.value}", target, why)
        raise Conflict(why)
    target = session.get(ModelVersion, target_id)
    _set_alias(session, CHAMPION, target, user.username)
    _drop_challenger(session, project_id, target_id)
    event = _event(
        session,
        project_id=project_id,
        action=action,
        alias=CHAMPION,
        from_id=expected_id,
        to=target,
        user=user,
        actor=user.username,
        reason=reason,
        evidence=evidence,
        policy_verdict=policy_verdict,
    )
    record_audit(
        session=session,
        actor=user,
        action=f"models.{action.value}",
        outcome="ok",
        target_type="model_version",
        target_id=target_no,
        detail={
            "from": expected_no,
            "to": target_no,
            "event_id": event.id,
            "evidence_sha256": event.evidence_sha256,
            "project_id": project_id,
        },
    )
    session.commit()
    return event


def _drop_challenger(session: Session, project_id: int, version_id: int) -> None:
    """The project's challenger stops being one if it points at ``version_id``."""
    challenger = session.get(ModelAlias, (project_id, CHALLENGER), populate_existing=True)
    if challenger is not None and challenger.version_id == version_id:
        session.execute(
            delete(ModelAlias).where(
                ModelAlias.project_id == project_id, ModelAlias.alias == CHALLENGER
            )
        )


def _integrity_or_refuse(
    session: Session, storage: Storage, user: User, action: str, row: ModelVersion
) -> None:
    try:
        verify_stored(storage=storage, row=row)
    except ArtifactIntegrityError as exc:
        _refuse(session, user, action, row, exc.detail)
        raise


def approve(
    *,
    session: Session,
    storage: Storage,
    version: str | int | ModelVersion,
    user: User,
    reason: str,
    cache_root: str | Path,
    override: bool = False,
    config: PolicyConfig | None = None,
    proposal: Proposal | None = None,
    project_id: int = DEFAULT_PROJECT_ID,
) -> PromotionEvent:
    """Make ``version`` the champion. Needs role ml_lead and a reason; a failing policy needs
    ``override=True`` and a written reason of at least 20 characters. ``proposal`` lets a UI
    approve exactly the evidence it showed (it must be for the same version)."""
    action = "models.approve"
    authorize(session, actor=user, allowed={Role.ML_LEAD}, action=action, project_id=project_id)
    reason = _check_reason(reason)
    cand = get_version(session=session, ref=version, project_id=project_id)
    champ = alias_of(session=session, alias=CHAMPION, project_id=project_id)
    if champ is not None and champ.id == cand.id:
        raise InvalidInput(f"v{cand.version} is already the champion")
    _integrity_or_refuse(session, storage, user, action, cand)
    if proposal is None or proposal.candidate.id != cand.id:
        proposal = propose(
            session=session,
            storage=storage,
            ref=cand,
            cache_root=cache_root,
            config=config,
            project_id=project_id,
        )
    verdict = proposal.policy.verdict
    if not proposal.policy.passed:
        if not override:
            why = "; ".join(proposal.policy.reasons)
            _refuse(session, user, action, cand, f"policy failed: {why}")
            raise InvalidInput(
                f"the promotion policy fails v{cand.version}: {why}. To approve anyway, "
                f"override with a written reason of at least {MIN_OVERRIDE_REASON} characters",
                code="policy_failed",
            )
        reason = _check_reason(
            reason, minimum=MIN_OVERRIDE_REASON, why=" to override a failing policy verdict"
        )
        verdict = "fail (overridden)"
    return _move_champion(
        session,
        action=PromotionAction.APPROVE,
        target=cand,
        expected_from=proposal.champion,
        user=user,
        reason=reason,
        evidence=proposal.evidence,
        policy_verdict=verdict,
    )


def reject(
    *,
    session: Session,
    version: str | int | ModelVersion,
    user: User,
    reason: str,
    project_id: int = DEFAULT_PROJECT_ID,
) -> PromotionEvent:
    """Decline a candidate: recorded, and it stops being the challenger."""
    action = "models.reject"
    authorize(session, actor=user, allowed={Role.ML_LEAD}, action=action, project_id=project_id)
    reason = _check_reason(reason)
    cand = get_version(session=session, ref=version, project_id=project_id)
    cand_id, cand_no = cand.id, cand.version
    _lock(session)
    champ = alias_of(session=session, alias=CHAMPION, project_id=project_id)
    if champ is not None and champ.id == cand_id:
        session.rollback()
        raise InvalidInput(
            f"v{cand_no} is the champion; roll back to another version instead of rejecting it"
        )
    cand = session.get(ModelVersion, cand_id)
    _drop_challenger(session, project_id, cand_id)
    event = _event(
        session,
        project_id=project_id,
        action=PromotionAction.REJECT,
        alias=CHALLENGER,
        from_id=cand_id,
        to=None,
        user=user,
        actor=user.username,
        reason=reason,
        evidence={"candidate": summary(cand, session=session)},
    )
    record_audit(
        session=session,
        actor=user,
        action=action,
        outcome="ok",
        target_type="model_version",
        target_id=cand_no,
        detail={"event_id": event.id, "project_id": project_id},
    )
    session.commit()
    return event


def champion_stack(*, session: Session, project_id: int = DEFAULT_PROJECT_ID) -> list[int]:
    """Version ids that have been the project's champion, oldest first, with rolled-back ones
    popped: approve pushes; rollback to an earlier entry truncates back to it."""
    stack: list[int] = []
    for ev in history(session=session, alias=CHAMPION, project_id=project_id):
        if ev.to_version_id is None:
            continue
        if ev.action == PromotionAction.ROLLBACK and ev.to_version_id in stack:
            del stack[stack.index(ev.to_version_id) + 1 :]
        else:
            stack.append(ev.to_version_id)
    return stack


def rollback(
    *,
    session: Session,
    storage: Storage,
    user: User,
    reason: str,
    to: str | int | ModelVersion | None = None,
    project_id: int = DEFAULT_PROJECT_ID,
) -> PromotionEvent:
    """Move the project's ``champion`` back to its previous champion, or to any earlier
    version ``to`` of the project."""
    action = "models.rollback"
    authorize(session, actor=user, allowed={Role.ML_LEAD}, action=action, project_id=project_id)
    reason = _check_reason(reason)
    champ = alias_of(session=session, alias=CHAMPION, project_id=project_id)
    if champ is None:
        raise InvalidInput("there is no champion to roll back")
    if to is None:
        stack = champion_stack(session=session, project_id=project_id)
        if len(stack) < 2:
            raise InvalidInput(
                f"v{champ.version} is the first champion; name the version to roll back to"
            )
        target = session.get(ModelVersion, stack[-2])
    else:
        target = get_version(session=session, ref=to, project_id=project_id)
    if target.id == champ.id:
        raise InvalidInput(f"v{target.version} is already the champion")
    _integrity_or_refuse(session, storage, user, action, target)
    evidence = {
        "from": summary(champ, session=session),
        "to": summary(target, session=session),
    }
    return _move_champion(
        session,
        action=PromotionAction.ROLLBACK,
        target=target,
        expected_from=champ,
        user=user,
        reason=reason,
        evidence=evidence,
        policy_verdict=None,
    )

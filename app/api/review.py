"""The review queue: the work to do, and settling or dismissing an item. Project-scoped."""

from typing import Literal

from fastapi import APIRouter, Query

from app.api.deps import AppSettings, CurrentProject, DbSession, Who, db_user
from app.api.schemas import ERRORS, ItemId, ResolveIn
from quarkflow_core.database import begin_write
from quarkflow_core.predictions import review_queue as queue_page
from quarkflow_core.review import dismiss_as_noise, project_classes, resolve_item
from quarkflow_core.schema import Role
from quarkflow_core.users import authorize

router = APIRouter()


@router.get("/review-queue", tags=["review"], responses=ERRORS)
def review_queue(
    who: Who,
    project: CurrentProject,
    s: DbSession,
    settings: AppSettings,
    limit: int = Query(50, ge=1, le=500),
    offset: int = Query(0, ge=0, le=10_000),
    strategy: Literal["uncertainty", "diverse"] | None = Query(
        None, description="Order of the next items; default QF_REVIEW_STRATEGY."
    ),
) -> dict:
    """The work to do: open, sent and disputed items (answered ones have left). Disputed
    first, then by the current champion's uncertainty, spread for diversity and class
    balance under the `diverse` strategy."""
    authorize(
        s,
        actor=who,
        allowed={Role.ANALYST, Role.ML_LEAD},
        action="review.queue",
        what="reading the review queue",
        project_id=project.id,
    )
    chosen = strategy or settings.review_strategy
    total, items = queue_page(
        session=s, limit=limit, offset=offset, strategy=chosen, project_id=project.id
    )
    return {"total": total, "strategy": chosen, "items": items}


@router.post("/review-queue/{item_id}/resolve", tags=["review"], responses=ERRORS)
def resolve_review_item(
    item_id: ItemId, body: ResolveIn, who: Who, project: CurrentProject, s: DbSession
) -> dict:
    """Settle an item (e.g. a disputed one) with a label (analyst or ml_lead)."""
    begin_write(s)  # SQLite: read-then-write takes the write lock first
    item = resolve_item(
        session=s,
        item_id=item_id,
        label=body.label,
        user=db_user(s, who),
        classes=project_classes(session=s, project_id=project.id),
        project_id=project.id,
    )
    return {"id": item.id, "state": item.state.value, "label": item.resolved_label}


@router.post("/review-queue/{item_id}/dismiss", tags=["review"], responses=ERRORS)
def dismiss_review_item(item_id: ItemId, who: Who, project: CurrentProject, s: DbSession) -> dict:
    """Mark an item as label noise: left out of training (analyst or ml_lead)."""
    begin_write(s)  # SQLite: read-then-write takes the write lock first
    item = dismiss_as_noise(session=s, item_id=item_id, user=db_user(s, who), project_id=project.id)
    return {"id": item.id, "state": item.state.value, "reason": item.reason.value}

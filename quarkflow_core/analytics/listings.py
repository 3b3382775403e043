"""Paged listings for the workbench: predictions with their latest verdict, feedback with who
gave it, training runs, and a snapshot's per-class changes; each within one project
(``project_id``, default: the default project)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from quarkflow_core.analytics.filters import Filters
from quarkflow_core.schema import (
    DEFAULT_PROJECT_ID,
    DatasetSnapshot,
    Feedback,
    ModelVersion,
    Prediction,
)


def count_predictions(
    *, session: Session, filters: Filters, project_id: int = DEFAULT_PROJECT_ID
) -> int:
    """How many of the project's predictions match (``Filters()``: whether it has any)."""
    conds = filters.where(session, project_id=project_id)
    return int(session.scalar(select(func.count()).select_from(Prediction).where(*conds)) or 0)


def list_predictions(
    *,
    session: Session,
    filters: Filters,
    limit: int = 24,
    offset: int = 0,
    project_id: int = DEFAULT_PROJECT_ID,
) -> tuple[int, list[dict[str, Any]]]:
    """(total, page) newest first, with image key and the latest feedback verdict."""
    from quarkflow_core.schema import Image

    conds = filters.where(session, project_id=project_id)
    total = count_predictions(session=session, filters=filters, project_id=project_id)
    latest_fb = (
        select(Feedback.verdict)
        .where(Feedback.prediction_id == Prediction.id)
        .order_by(Feedback.created_at.desc())
        .limit(1)
        .scalar_subquery()
    )
    rows = session.execute(
        select(Prediction, Image.storage_key, ModelVersion.version, latest_fb.label("verdict"))
        .join(Image, Image.id == Prediction.image_id)
        .outerjoin(ModelVersion, ModelVersion.id == Prediction.model_version_id)
        .where(*conds)
        .order_by(Prediction.created_at.desc())
        .limit(limit)
        .offset(offset)
    ).all()
    return int(total), [
        {
            "id": p.id,
            "label": p.label,
            "confidence": p.confidence,
            "topk": p.topk,
            "model_version": version,
            "storage_key": key,
            "verdict": verdict.value if verdict is not None else None,
            "created_at": p.created_at,
        }
        for p, key, version, verdict in rows
    ]


def _feedback_rows(
    session: Session, *conds: Any, newest_first: bool, limit: int | None = None
) -> list[dict[str, Any]]:
    """Feedback with who gave it (``None``: anonymous) and what the model had said."""
    from quarkflow_core.schema import User

    order = Feedback.created_at.desc() if newest_first else Feedback.created_at
    rows = session.execute(
        select(Feedback, User.username, Prediction.label, ModelVersion.version)
        .join(Prediction, Prediction.id == Feedback.prediction_id)
        .outerjoin(ModelVersion, ModelVersion.id == Prediction.model_version_id)
        .outerjoin(User, User.id == Feedback.user_id)
        .where(*conds)
        .order_by(order)
        .limit(limit)
    ).all()
    return [
        {
            "prediction_id": f.prediction_id,
            "user": username,
            "verdict": f.verdict.value,
            "predicted": predicted,
            "true_label": f.true_label,
            "model_version": version,
            "comment": f.comment,
            "created_at": f.created_at,
        }
        for f, username, predicted, version in rows
    ]


def prediction_feedback(
    *, session: Session, prediction_id: str, project_id: int = DEFAULT_PROJECT_ID
) -> list[dict[str, Any]]:
    """Feedback on one prediction of the project, oldest first (none for another project's)."""
    return _feedback_rows(
        session,
        Feedback.prediction_id == prediction_id,
        Prediction.project_id == project_id,
        newest_first=False,
    )


def recent_feedback(
    *, session: Session, filters: Filters, limit: int = 8, project_id: int = DEFAULT_PROJECT_ID
) -> list[dict[str, Any]]:
    """The latest verdicts on the project's predictions matching ``filters``, newest first."""
    conds = filters.where(session, project_id=project_id)
    if filters.start is not None:
        conds.append(Feedback.created_at >= filters.start)
    return _feedback_rows(session, *conds, newest_first=True, limit=limit)


def training_runs(
    *, session: Session, limit: int = 50, project_id: int = DEFAULT_PROJECT_ID
) -> list[dict[str, Any]]:
    """The project's training runs, newest first."""
    from quarkflow_core.schema import TrainingRun

    runs = session.scalars(
        select(TrainingRun)
        .where(TrainingRun.project_id == project_id)
        .order_by(TrainingRun.id.desc())
        .limit(limit)
    )
    out = []
    for r in runs:
        seconds = (
            (r.finished_at - r.started_at).total_seconds()
            if r.finished_at and r.started_at
            else None
        )
        out.append(
            {
                "id": r.id,
                "status": r.status.value,
                "snapshot_id": r.snapshot_id,
                "device": r.device,
                "architecture": r.config.get("architecture"),
                "epochs": r.config.get("epochs"),
                "seconds": seconds,
                "accuracy": r.metrics.get("accuracy"),
                "history": r.progress.get("history", []),
                "error": r.error,
                "started_at": r.started_at,
            }
        )
    return out


def snapshot_diff(
    *, session: Session, snapshot_id: int, project_id: int = DEFAULT_PROJECT_ID
) -> dict[str, Any]:
    """Per-class counts of a snapshot and what changed since its parent (or the project's
    previous one). Another project's snapshot is NotFound, as an unknown id is."""
    snap = session.get(DatasetSnapshot, snapshot_id)
    if snap is None or snap.project_id != project_id:
        from quarkflow_core.errors import NotFound

        raise NotFound(f"no dataset snapshot {snapshot_id}")
    prev_id = snap.parent_id or session.scalar(
        select(func.max(DatasetSnapshot.id)).where(
            DatasetSnapshot.project_id == project_id, DatasetSnapshot.id < snapshot_id
        )
    )
    prev = session.get(DatasetSnapshot, prev_id) if prev_id else None
    if prev is not None and prev.project_id != project_id:
        prev = None
    rows = []
    for split in sorted(set(snap.class_counts) | set(prev.class_counts if prev else {})):
        now = snap.class_counts.get(split, {})
        before = prev.class_counts.get(split, {}) if prev else {}
        for label in sorted(set(now) | set(before), key=lambda x: (len(x), x)):
            rows.append(
                {
                    "split": split,
                    "label": label,
                    "count": int(now.get(label, 0)),
                    "change": int(now.get(label, 0)) - int(before.get(label, 0)),
                }
            )
    return {
        "id": snap.id,
        "name": snap.name,
        "items": snap.num_items,
        "created_at": snap.created_at,
        "previous": prev.id if prev else None,
        "rows": rows,
    }

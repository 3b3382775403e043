"""Monitoring aggregations, computed in SQL: totals and time series, latency percentiles,
confidence histograms, class distribution and drift against the training snapshot; each within
one project (``project_id``, default: the default project)."""

from __future__ import annotations

import math
from datetime import datetime
from typing import Any

from sqlalchemy import Float, Integer, case, cast, func, select
from sqlalchemy.orm import Session

from quarkflow_core.analytics.filters import Filters
from quarkflow_core.schema import (
    DEFAULT_PROJECT_ID,
    DatasetSnapshot,
    Feedback,
    ModelAlias,
    ModelVersion,
    Prediction,
    ReviewItem,
    ReviewState,
    Verdict,
)

BUCKETS = {"hour": "%Y-%m-%d %H:00", "day": "%Y-%m-%d"}


def _bucket(session: Session, column: Any, bucket: str) -> Any:
    """A GROUP BY key per time bucket: ``date_trunc`` on Postgres (cheap, index-friendly),
    ``strftime`` on SQLite. ``_label`` turns either into the same display string."""
    if bucket not in BUCKETS:
        raise ValueError(f"bucket must be one of {sorted(BUCKETS)}")
    if session.get_bind().dialect.name == "postgresql":
        return func.date_trunc(bucket, column)
    return func.strftime(BUCKETS[bucket], column)


def _label(value: Any, bucket: str) -> str:
    if isinstance(value, datetime):
        return value.strftime(BUCKETS[bucket])
    return str(value)


def _percentiles(
    session: Session, conds: list[Any], qs=(0.5, 0.95, 0.99)
) -> dict[str, float | None]:
    if session.get_bind().dialect.name == "postgresql":
        row = session.execute(
            select(
                *[
                    func.percentile_cont(q)
                    .within_group(Prediction.latency_ms)
                    .label(f"p{int(q * 100)}")
                    for q in qs
                ]
            ).where(*conds)
        ).one()
        return {f"p{int(q * 100)}": row[i] for i, q in enumerate(qs)}
    # SQLite: the same linear interpolation as percentile_cont, from the two neighbouring
    # values of the sorted range (fetched with ORDER BY/OFFSET, never the whole column).
    n = session.scalar(select(func.count()).select_from(Prediction).where(*conds)) or 0
    out: dict[str, float | None] = {}
    for q in qs:
        if n == 0:
            out[f"p{int(q * 100)}"] = None
            continue
        pos = q * (n - 1)
        low = math.floor(pos)
        pair = session.scalars(
            select(Prediction.latency_ms)
            .where(*conds)
            .order_by(Prediction.latency_ms)
            .offset(low)
            .limit(2)
        ).all()
        high = pair[1] if len(pair) > 1 else pair[0]
        out[f"p{int(q * 100)}"] = pair[0] + (high - pair[0]) * (pos - low)
    return out


def overview(
    *,
    session: Session,
    filters: Filters,
    bucket: str = "hour",
    project_id: int = DEFAULT_PROJECT_ID,
) -> dict[str, Any]:
    """Totals, a time series, latency percentiles, live accuracy, queue depth."""
    conds = filters.where(session, project_id=project_id)
    b = _bucket(session, Prediction.created_at, bucket).label("bucket")
    series = session.execute(
        select(
            b,
            func.count().label("predictions"),
            func.avg(Prediction.confidence).label("mean_confidence"),
            func.avg(Prediction.latency_ms).label("mean_latency_ms"),
        )
        .where(*conds)
        .group_by(b)
        .order_by(b)
    ).all()
    fb_b = _bucket(session, Feedback.created_at, bucket).label("bucket")
    fb_series = session.execute(
        select(
            fb_b,
            func.count().label("n"),
            cast(func.sum(case((Feedback.verdict == Verdict.CORRECT, 1), else_=0)), Float).label(
                "correct"
            ),
        )
        .join(Prediction, Prediction.id == Feedback.prediction_id)
        .where(*conds)
        .group_by(fb_b)
        .order_by(fb_b)
    ).all()
    queue = dict(
        session.execute(
            select(ReviewItem.state, func.count())
            .where(ReviewItem.project_id == project_id)
            .group_by(ReviewItem.state)
        )
        .tuples()
        .all()
    )
    total = sum(r.predictions for r in series)
    fb_n = sum(r.n for r in fb_series)
    fb_correct = sum(r.correct or 0 for r in fb_series)
    return {
        "predictions": total,
        "feedback": fb_n,
        "live_accuracy": (fb_correct / fb_n) if fb_n else None,
        "latency_ms": _percentiles(session, conds),
        "series": [
            {
                "bucket": _label(r.bucket, bucket),
                "predictions": r.predictions,
                "mean_confidence": float(r.mean_confidence or 0),
                "mean_latency_ms": float(r.mean_latency_ms or 0),
            }
            for r in series
        ],
        "accuracy_series": [
            {
                "bucket": _label(r.bucket, bucket),
                "feedback": r.n,
                "accuracy": (r.correct / r.n) if r.n else None,
            }
            for r in fb_series
        ],
        "review_queue": {
            "open": queue.get(ReviewState.OPEN, 0),
            "sent": queue.get(ReviewState.SENT, 0),
            "disputed": queue.get(ReviewState.DISPUTED, 0),
            "resolved": queue.get(ReviewState.RESOLVED, 0),
        },
    }


def confidence_histogram(
    *,
    session: Session,
    filters: Filters,
    bucket: str = "day",
    bins: int = 10,
    project_id: int = DEFAULT_PROJECT_ID,
) -> list[dict[str, Any]]:
    """Counts of predictions per (time bucket, confidence bin of width 1/bins)."""
    conds = filters.where(session, project_id=project_id)
    b = _bucket(session, Prediction.created_at, bucket).label("bucket")
    scaled = Prediction.confidence * bins
    if session.get_bind().dialect.name == "postgresql":
        binned = cast(func.floor(scaled), Integer).label("bin")
    else:
        binned = cast(scaled, Integer).label("bin")  # SQLite truncates toward zero
    rows = session.execute(
        select(b, binned, func.count()).where(*conds).group_by(b, binned).order_by(b, binned)
    ).all()
    out: dict[tuple[str, int], int] = {}
    for bucket_, bin_, n in rows:
        key = (_label(bucket_, bucket), min(int(bin_), bins - 1))  # 1.0 joins the top bin
        out[key] = out.get(key, 0) + int(n)
    return [{"bucket": k[0], "bin": k[1] / bins, "count": n} for k, n in sorted(out.items())]


def class_distribution(
    *, session: Session, filters: Filters, project_id: int = DEFAULT_PROJECT_ID
) -> dict[str, int]:
    conds = filters.where(session, project_id=project_id)
    return dict(
        session.execute(
            select(Prediction.label, func.count()).where(*conds).group_by(Prediction.label)
        )
        .tuples()
        .all()
    )


def _serving_version(session: Session, model_version: int | None, project_id: int):
    """The filtered version (by number) of the project, else its champion; None if neither."""
    if model_version is not None:
        where = [ModelVersion.version == model_version]
    else:
        champion = select(ModelAlias.version_id).where(
            ModelAlias.project_id == project_id,
            ModelAlias.alias == "champion",  # registry.CHAMPION
        )
        where = [ModelVersion.id == champion.scalar_subquery()]
    return session.scalar(select(ModelVersion).where(ModelVersion.project_id == project_id, *where))


def drift(
    *, session: Session, filters: Filters, project_id: int = DEFAULT_PROJECT_ID
) -> dict[str, Any]:
    """Predicted-class distribution vs the serving model's training snapshot (train split):
    population stability index and Jensen-Shannon distance (0 = identical)."""
    version = _serving_version(session, filters.model_version, project_id)
    live = class_distribution(
        session=session,
        filters=Filters(filters.start, filters.end, filters.model_version),
        project_id=project_id,
    )
    if version is None or version.snapshot_id is None:
        return {"version": None, "live": live, "train": {}, "psi": None, "js_distance": None}
    snap = session.get(DatasetSnapshot, version.snapshot_id)
    train = {k: int(v) for k, v in (snap.class_counts or {}).get("train", {}).items()}
    classes = sorted(set(train) | set(live) | set(version.classes))
    p = _normalise([train.get(c, 0) for c in classes])
    q = _normalise([live.get(c, 0) for c in classes])
    psi = sum((qi - pi) * math.log(qi / pi) for pi, qi in zip(p, q, strict=True))
    m = [(pi + qi) / 2 for pi, qi in zip(p, q, strict=True)]
    js = math.sqrt(max(0.0, 0.5 * _kl(p, m) + 0.5 * _kl(q, m)) / math.log(2))
    return {
        "version": version.version,
        "classes": classes,
        "train": {c: train.get(c, 0) for c in classes},
        "live": {c: live.get(c, 0) for c in classes},
        "psi": psi if sum(live.values()) else None,
        "js_distance": js if sum(live.values()) else None,
    }


def _normalise(counts: list[int], eps: float = 1e-6) -> list[float]:
    total = sum(counts)
    if total == 0:
        return [1.0 / len(counts)] * len(counts)
    probs = [max(c / total, eps) for c in counts]
    s = sum(probs)
    return [x / s for x in probs]


def _kl(p: list[float], q: list[float]) -> float:
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True) if pi > 0)

"""Aggregations for the workbench, computed in SQL (time buckets, GROUP BY, indexes on
created_at): pages never load all rows. Works on Postgres (date_trunc, percentile_cont) and
SQLite (strftime; the same interpolated percentiles by ORDER BY/OFFSET over the filtered
range): both give the same numbers (tests/test_analytics.py)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Float, Integer, case, cast, func, select
from sqlalchemy.orm import Session

from quarkflow_core.schema import (
    DatasetSnapshot,
    Feedback,
    ModelVersion,
    Prediction,
    ReviewItem,
    ReviewState,
    Verdict,
)

BUCKETS = {"hour": "%Y-%m-%d %H:00", "day": "%Y-%m-%d"}


@dataclass(frozen=True)
class Filters:
    start: datetime | None = None
    end: datetime | None = None
    model_version: int | None = None  # the version *number*
    label: str | None = None

    def where(self, session: Session) -> list[Any]:
        conds: list[Any] = []
        if self.start is not None:
            conds.append(Prediction.created_at >= self.start)
        if self.end is not None:
            conds.append(Prediction.created_at < self.end)
        if self.model_version is not None:
            vid = session.scalar(
                select(ModelVersion.id).where(ModelVersion.version == self.model_version)
            )
            conds.append(Prediction.model_version_id == vid)
        if self.label:
            conds.append(Prediction.label == self.label)
        return conds


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


def overview(*, session: Session, filters: Filters, bucket: str = "hour") -> dict[str, Any]:
    """Totals, a time series, latency percentiles, live accuracy, queue depth."""
    conds = filters.where(session)
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
        session.execute(select(ReviewItem.state, func.count()).group_by(ReviewItem.state))
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
    *, session: Session, filters: Filters, bucket: str = "day", bins: int = 10
) -> list[dict[str, Any]]:
    """Counts of predictions per (time bucket, confidence bin of width 1/bins)."""
    conds = filters.where(session)
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


def class_distribution(*, session: Session, filters: Filters) -> dict[str, int]:
    conds = filters.where(session)
    return dict(
        session.execute(
            select(Prediction.label, func.count()).where(*conds).group_by(Prediction.label)
        )
        .tuples()
        .all()
    )


def drift(*, session: Session, filters: Filters) -> dict[str, Any]:
    """Predicted-class distribution vs the serving model's training snapshot (train split):
    population stability index and Jensen-Shannon distance (0 = identical)."""
    from quarkflow_core import registry

    version = (
        registry.get_version(session=session, ref=filters.model_version)
        if filters.model_version is not None
        else registry.alias_of(session=session, alias=registry.CHAMPION)
    )
    live = class_distribution(
        session=session, filters=Filters(filters.start, filters.end, filters.model_version)
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


# --------------------------------------------------------------------------- listings


def count_predictions(*, session: Session, filters: Filters) -> int:
    """How many predictions match (``Filters()``: whether there are any at all)."""
    conds = filters.where(session)
    return int(session.scalar(select(func.count()).select_from(Prediction).where(*conds)) or 0)


def list_predictions(
    *, session: Session, filters: Filters, limit: int = 24, offset: int = 0
) -> tuple[int, list[dict[str, Any]]]:
    """(total, page) newest first, with image key and the latest feedback verdict."""
    from quarkflow_core.schema import Image

    conds = filters.where(session)
    total = count_predictions(session=session, filters=filters)
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


def prediction_feedback(*, session: Session, prediction_id: str) -> list[dict[str, Any]]:
    """Feedback on one prediction, oldest first."""
    return _feedback_rows(session, Feedback.prediction_id == prediction_id, newest_first=False)


def recent_feedback(*, session: Session, filters: Filters, limit: int = 8) -> list[dict[str, Any]]:
    """The latest verdicts on predictions matching ``filters``, newest first."""
    conds = filters.where(session)
    if filters.start is not None:
        conds.append(Feedback.created_at >= filters.start)
    return _feedback_rows(session, *conds, newest_first=True, limit=limit)


def training_runs(*, session: Session, limit: int = 50) -> list[dict[str, Any]]:
    from quarkflow_core.schema import TrainingRun

    runs = session.scalars(select(TrainingRun).order_by(TrainingRun.id.desc()).limit(limit))
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


def snapshot_diff(*, session: Session, snapshot_id: int) -> dict[str, Any]:
    """Per-class counts of a snapshot and what changed since its parent (or the previous one)."""
    snap = session.get(DatasetSnapshot, snapshot_id)
    if snap is None:
        from quarkflow_core.errors import NotFound

        raise NotFound(f"no dataset snapshot {snapshot_id}")
    prev_id = snap.parent_id or session.scalar(
        select(func.max(DatasetSnapshot.id)).where(DatasetSnapshot.id < snapshot_id)
    )
    prev = session.get(DatasetSnapshot, prev_id) if prev_id else None
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


def api_request_counts(api_url: str | None, timeout_s: float = 2.0) -> dict[str, Any] | None:
    """Requests by outcome since the API process started, from its Prometheus /metrics (the
    rejected and failed ones never reach the database), and the outbox's gauges (depth, dead
    letters, oldest record's age, outage). None when the API is unreachable."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    if not api_url:
        return None
    try:
        text = httpx.get(api_url.rstrip("/") + "/metrics", timeout=timeout_s).text
    except httpx.HTTPError:
        return None
    out = {"success": 0, "client_error": 0, "server_error": 0, "by_route": {}, "outbox": {}}
    gauges = {
        "qf_outbox_depth": "depth",
        "qf_outbox_dead_letters": "dead_letters",
        "qf_outbox_oldest_seconds": "oldest_s",
        "qf_outbox_outage": "outage",
    }
    for family in text_string_to_metric_families(text):
        if family.name in gauges and family.samples:
            out["outbox"][gauges[family.name]] = family.samples[0].value
        if family.name != "qf_http_requests":
            continue
        for sample in family.samples:
            if not sample.name.endswith("_total"):
                continue
            status = int(sample.labels.get("status", "0"))
            kind = "success" if status < 400 else "client_error" if status < 500 else "server_error"
            out[kind] += int(sample.value)
            route = sample.labels.get("route", "?")
            out["by_route"][route] = out["by_route"].get(route, 0) + int(sample.value)
    return out

"""The workbench's SQL aggregations against values computed independently (numpy, scipy, by
hand) from a small known data set, on SQLite and on Postgres: both databases must give the same
numbers."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
from scipy.spatial.distance import jensenshannon

from quarkflow_core import analytics
from quarkflow_core.analytics import Filters
from quarkflow_core.schema import (
    DatasetSnapshot,
    Feedback,
    Image,
    ModelAlias,
    ModelVersion,
    Prediction,
    ReviewItem,
    ReviewReason,
    ReviewState,
    Verdict,
)

pytestmark = pytest.mark.integration

T0 = datetime(2026, 1, 1, 10, 0, tzinfo=UTC)
# (minutes after T0, label, calibrated confidence, latency ms, verdict given or None)
ROWS = [
    (5, "3", 0.95, 12.0, Verdict.CORRECT),
    (30, "3", 0.55, 30.0, Verdict.WRONG),
    (59, "7", 1.00, 8.0, None),
    (60, "7", 0.72, 19.0, Verdict.CORRECT),
    (105, "1", 0.31, 55.0, None),
    (1380, "3", 0.88, 10.0, Verdict.CORRECT),  # next day, 09:00
    (1385, "1", 0.999, 41.0, Verdict.WRONG),
]
TRAIN = {"1": 50, "3": 30, "7": 20}  # the serving version's training split


@pytest.fixture
def known(db_session):
    s = db_session
    snap = DatasetSnapshot(
        name="s",
        content_hash="c" * 64,
        classes=sorted(TRAIN),
        class_counts={"train": TRAIN},
        num_items=sum(TRAIN.values()),
    )
    s.add(snap)
    s.flush()
    version = ModelVersion(
        version=1,
        architecture="smallcnn",
        classes=sorted(TRAIN),
        artifact_key="models/v1",
        sha256="a" * 64,
        snapshot_id=snap.id,
    )
    s.add(version)
    s.flush()
    s.add(ModelAlias(alias="champion", version_id=version.id))
    for i, (minutes, label, conf, latency, verdict) in enumerate(ROWS):
        image = Image(
            sha256=f"{i:064d}",
            storage_key=f"images/{i}.png",
            width=28,
            height=28,
            format="PNG",
            size_bytes=100,
            source="test",
        )
        s.add(image)
        s.flush()
        when = T0 + timedelta(minutes=minutes)
        pred = Prediction(
            image_id=image.id,
            model_version_id=version.id,
            label=label,
            confidence=conf,
            latency_ms=latency,
            created_at=when,
        )
        s.add(pred)
        s.flush()
        if verdict is not None:
            s.add(
                Feedback(
                    prediction_id=pred.id,
                    verdict=verdict,
                    true_label=label if verdict == Verdict.CORRECT else "9",
                    created_at=when + timedelta(minutes=1),
                )
            )
        if i < 3:
            state = (ReviewState.OPEN, ReviewState.DISPUTED, ReviewState.RESOLVED)[i]
            s.add(
                ReviewItem(
                    image_id=image.id,
                    prediction_id=pred.id,
                    reason=ReviewReason.LOW_CONFIDENCE,
                    state=state,
                )
            )
    s.flush()
    return s


def test_overview_matches_independent_computation(known):
    ov = analytics.overview(session=known, filters=Filters(), bucket="hour")
    latencies = [r[3] for r in ROWS]
    assert ov["predictions"] == len(ROWS)
    verdicts = [r[4] for r in ROWS if r[4] is not None]
    assert ov["feedback"] == len(verdicts)
    assert ov["live_accuracy"] == pytest.approx(verdicts.count(Verdict.CORRECT) / len(verdicts))
    # percentiles interpolate linearly (Postgres percentile_cont == numpy's default) everywhere
    for q in (50, 95, 99):
        assert ov["latency_ms"][f"p{q}"] == pytest.approx(np.percentile(latencies, q))
    by_hour: dict[str, list] = {}
    for minutes, _, conf, latency, _ in ROWS:
        key = (T0 + timedelta(minutes=minutes)).strftime("%Y-%m-%d %H:00")
        by_hour.setdefault(key, []).append((conf, latency))
    assert [r["bucket"] for r in ov["series"]] == sorted(by_hour)
    for row in ov["series"]:
        confs, lats = zip(*by_hour[row["bucket"]], strict=True)
        assert row["predictions"] == len(confs)
        assert row["mean_confidence"] == pytest.approx(np.mean(confs))
        assert row["mean_latency_ms"] == pytest.approx(np.mean(lats))
    # feedback is bucketed by when it was given: one minute after each prediction
    acc = {r["bucket"]: (r["feedback"], r["accuracy"]) for r in ov["accuracy_series"]}
    assert acc == {
        "2026-01-01 10:00": (2, 0.5),
        "2026-01-01 11:00": (1, 1.0),
        "2026-01-02 09:00": (2, 0.5),
    }
    assert ov["review_queue"] == {"open": 1, "sent": 0, "disputed": 1, "resolved": 1}

    day = analytics.overview(session=known, filters=Filters(), bucket="day")
    assert [(r["bucket"], r["predictions"]) for r in day["series"]] == [
        ("2026-01-01", 5),
        ("2026-01-02", 2),
    ]


def test_filters_narrow_every_number(known):
    ov = analytics.overview(
        session=known,
        filters=Filters(start=T0 + timedelta(minutes=30), end=T0 + timedelta(hours=20)),
    )
    assert ov["predictions"] == 4  # minutes 30, 59, 60, 105
    assert ov["latency_ms"]["p50"] == pytest.approx(np.percentile([30.0, 8.0, 19.0, 55.0], 50))
    only3 = analytics.overview(session=known, filters=Filters(label="3", model_version=1))
    assert only3["predictions"] == 3 and only3["feedback"] == 3
    assert only3["live_accuracy"] == pytest.approx(2 / 3)
    none = analytics.overview(session=known, filters=Filters(model_version=2))
    assert none["predictions"] == 0 and none["latency_ms"]["p50"] is None


def test_confidence_histogram_and_class_distribution(known):
    hist = analytics.confidence_histogram(session=known, filters=Filters(), bucket="day", bins=10)
    expected: dict[tuple[str, float], int] = {}
    for minutes, _, conf, _, _ in ROWS:
        day = (T0 + timedelta(minutes=minutes)).strftime("%Y-%m-%d")
        b = min(math.floor(conf * 10), 9) / 10  # 1.0 joins the top bin
        expected[(day, b)] = expected.get((day, b), 0) + 1
    assert {(h["bucket"], h["bin"]): h["count"] for h in hist} == expected
    dist = analytics.class_distribution(session=known, filters=Filters())
    assert dist == {"3": 3, "7": 2, "1": 2}


def test_drift_psi_and_js_distance(known):
    out = analytics.drift(session=known, filters=Filters())
    classes = sorted(TRAIN)
    live = {"1": 2, "3": 3, "7": 2}
    p = np.array([TRAIN[c] for c in classes], float)
    q = np.array([live[c] for c in classes], float)
    p, q = p / p.sum(), q / q.sum()
    assert out["version"] == 1 and out["classes"] == classes
    assert out["train"] == TRAIN and out["live"] == live
    assert out["psi"] == pytest.approx(float(np.sum((q - p) * np.log(q / p))), rel=1e-4)
    assert out["js_distance"] == pytest.approx(float(jensenshannon(p, q, base=2)), rel=1e-4)

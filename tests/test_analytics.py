"""The workbench's SQL aggregations against values computed independently (numpy, scipy, by
hand) from a small known data set, on SQLite and on Postgres: both databases must give the same
numbers. A second project (``birds``) with its own version 1, champion, snapshots, predictions,
feedback, review items and training runs sits in the same database throughout: the default
project's numbers never include it, and its own never include the default project's."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
from scipy.spatial.distance import jensenshannon
from sqlalchemy import select

from quarkflow_core import analytics, projects
from quarkflow_core.analytics import Filters
from quarkflow_core.errors import NotFound
from quarkflow_core.schema import (
    DEFAULT_PROJECT_ID,
    DatasetSnapshot,
    Feedback,
    Image,
    ModelAlias,
    ModelVersion,
    Prediction,
    ReviewItem,
    ReviewReason,
    ReviewState,
    RunStatus,
    TrainingRun,
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
# the other project: the same shape of rows, none of the same numbers
BIRD_ROWS = [
    (10, "robin", 0.60, 100.0, Verdict.WRONG),
    (70, "wren", 0.90, 200.0, Verdict.CORRECT),
    (2000, "robin", 0.80, 300.0, None),
]
BIRD_TRAIN = {"robin": 4, "wren": 6}


def _snapshot(
    s, project_id: int, train: dict[str, int], content_hash: str = "c" * 64, parent_id=None
) -> DatasetSnapshot:
    snap = DatasetSnapshot(
        project_id=project_id,
        name=f"s{project_id}",
        content_hash=content_hash,  # unique per project: both projects' first is "ccc..."
        classes=sorted(train),
        class_counts={"train": train},
        num_items=sum(train.values()),
        parent_id=parent_id,
    )
    s.add(snap)
    s.flush()
    return snap


def _fill(s, project_id: int, rows: list, train: dict[str, int], states: tuple) -> None:
    """A project's champion v1 (trained on ``train``), ``rows`` of predictions with their
    feedback, review items in ``states`` for the first rows, and a training run."""
    snap = _snapshot(s, project_id, train)
    version = ModelVersion(
        project_id=project_id,
        version=1,  # each project counts from v1
        architecture="smallcnn",
        classes=sorted(train),
        artifact_key=f"models/{project_id}/v1",
        sha256=f"{project_id:064d}",
        snapshot_id=snap.id,
    )
    s.add(version)
    s.flush()
    s.add(ModelAlias(project_id=project_id, alias="champion", version_id=version.id))
    s.add(
        TrainingRun(
            project_id=project_id,
            status=RunStatus.SUCCEEDED,
            config={"architecture": f"net-{project_id}", "epochs": project_id},
            snapshot_id=snap.id,
        )
    )
    for i, (minutes, label, conf, latency, verdict) in enumerate(rows):
        image = Image(
            project_id=project_id,
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
            project_id=project_id,
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
        if i < len(states):
            state = states[i]
            s.add(
                ReviewItem(
                    project_id=project_id,
                    image_id=image.id,
                    prediction_id=pred.id,
                    reason=ReviewReason.LOW_CONFIDENCE,
                    state=state,
                )
            )
    s.flush()


@pytest.fixture
def birds_id(db_session) -> int:
    return projects.create_project(
        session=db_session, name="birds", classes=sorted(BIRD_TRAIN), created_by="test"
    ).id


@pytest.fixture
def known(db_session, birds_id):
    """The default project's ROWS, and the birds project's BIRD_ROWS beside them."""
    _fill(db_session, birds_id, BIRD_ROWS, BIRD_TRAIN, (ReviewState.SENT, ReviewState.SENT))
    states = (ReviewState.OPEN, ReviewState.DISPUTED, ReviewState.RESOLVED)
    _fill(db_session, DEFAULT_PROJECT_ID, ROWS, TRAIN, states)
    return db_session


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


# --------------------------------------------------------------------------- two projects


def test_the_other_project_sees_only_its_own(known, birds_id):
    ov = analytics.overview(session=known, filters=Filters(), bucket="day", project_id=birds_id)
    assert ov["predictions"] == len(BIRD_ROWS) and ov["feedback"] == 2
    assert ov["live_accuracy"] == pytest.approx(0.5)
    assert ov["latency_ms"]["p50"] == pytest.approx(200.0)
    assert [(r["bucket"], r["predictions"]) for r in ov["series"]] == [
        ("2026-01-01", 2),
        ("2026-01-02", 1),
    ]
    assert ov["review_queue"] == {"open": 0, "sent": 2, "disputed": 0, "resolved": 0}
    # version numbers are the project's own: its v1, not the default project's
    v1 = analytics.overview(session=known, filters=Filters(model_version=1), project_id=birds_id)
    assert v1["predictions"] == len(BIRD_ROWS)
    none = analytics.overview(session=known, filters=Filters(model_version=2), project_id=birds_id)
    assert none["predictions"] == 0
    dist = analytics.class_distribution(session=known, filters=Filters(), project_id=birds_id)
    assert dist == {"robin": 2, "wren": 1}
    hist = analytics.confidence_histogram(
        session=known, filters=Filters(), bucket="day", project_id=birds_id
    )
    assert sum(h["count"] for h in hist) == len(BIRD_ROWS)
    assert {h["bin"] for h in hist} == {0.6, 0.9, 0.8}
    out = analytics.drift(session=known, filters=Filters(), project_id=birds_id)
    assert out["version"] == 1 and out["classes"] == ["robin", "wren"]
    assert out["train"] == BIRD_TRAIN and out["live"] == {"robin": 2, "wren": 1}


def test_listings_never_mix_projects(known, birds_id):
    total, rows = analytics.list_predictions(session=known, filters=Filters(), limit=100)
    assert total == len(ROWS) and {r["label"] for r in rows} == {"1", "3", "7"}
    b_total, b_rows = analytics.list_predictions(
        session=known, filters=Filters(), limit=100, project_id=birds_id
    )
    assert b_total == len(BIRD_ROWS) and {r["label"] for r in b_rows} == {"robin", "wren"}
    assert analytics.count_predictions(session=known, filters=Filters(), project_id=birds_id) == 3
    assert analytics.count_predictions(session=known, filters=Filters(label="robin")) == 0

    fb = analytics.recent_feedback(session=known, filters=Filters(), limit=100)
    assert len(fb) == 5 and {f["predicted"] for f in fb} <= {"1", "3", "7"}
    b_fb = analytics.recent_feedback(
        session=known, filters=Filters(), limit=100, project_id=birds_id
    )
    assert sorted(f["predicted"] for f in b_fb) == ["robin", "wren"]
    # one prediction's feedback, asked in the wrong project: none (as for an unknown id)
    bird_pred = b_rows[-1]["id"]  # the oldest: robin, marked wrong
    assert analytics.prediction_feedback(session=known, prediction_id=bird_pred) == []
    own = analytics.prediction_feedback(session=known, prediction_id=bird_pred, project_id=birds_id)
    assert [f["verdict"] for f in own] == ["wrong"]

    runs = analytics.training_runs(session=known)
    assert [r["architecture"] for r in runs] == [f"net-{DEFAULT_PROJECT_ID}"]
    b_runs = analytics.training_runs(session=known, project_id=birds_id)
    assert [r["architecture"] for r in b_runs] == [f"net-{birds_id}"]


def test_snapshot_diff_stays_in_its_project(known, birds_id):
    def first(project_id: int) -> DatasetSnapshot:
        return known.scalars(
            select(DatasetSnapshot).where(DatasetSnapshot.project_id == project_id)
        ).one()

    bird1, default1 = first(birds_id), first(DEFAULT_PROJECT_ID)
    # birds' snapshot has the lower id: the default project's first still has no previous one
    assert bird1.id < default1.id
    assert analytics.snapshot_diff(session=known, snapshot_id=default1.id)["previous"] is None
    # interleaved: the default project's second snapshot lies between birds' first and second
    default2 = _snapshot(known, DEFAULT_PROJECT_ID, {**TRAIN, "7": 25}, "d" * 64)
    bird2 = _snapshot(known, birds_id, {**BIRD_TRAIN, "finch": 3}, "d" * 64)
    diff = analytics.snapshot_diff(session=known, snapshot_id=bird2.id, project_id=birds_id)
    assert diff["previous"] == bird1.id
    assert {(r["label"], r["change"]) for r in diff["rows"]} == {
        ("finch", 3),
        ("robin", 0),
        ("wren", 0),
    }
    diff = analytics.snapshot_diff(session=known, snapshot_id=default2.id)
    assert diff["previous"] == default1.id
    assert {r["label"]: r["change"] for r in diff["rows"]} == {"1": 0, "3": 0, "7": 5}
    # another project's snapshot is NotFound, as an unknown id is
    with pytest.raises(NotFound):
        analytics.snapshot_diff(session=known, snapshot_id=bird2.id)
    with pytest.raises(NotFound):
        analytics.snapshot_diff(session=known, snapshot_id=default2.id, project_id=birds_id)

"""One PredictionService serving two projects, each with its own champion: a prediction uses the
named project's model and lands in that project (image and prediction rows, through the outbox,
its dead letters and a replay), a prediction is found only through its own project, feedback is
checked against its project's prediction and classes, each project's champion is picked up
(lazily, on first use, or by the watcher's poll), and each project's last-served model comes
back from its own pointer when the database is down at start. No HTTP here (test_projects_api,
test_projects)."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
from helpers.data import SEED_SIZE
from helpers.serving import local_deploy, wait_until
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from quarkflow_core import projects, registry
from quarkflow_core.demo_data import demo_pngs, ingest_seed
from quarkflow_core.errors import InvalidInput, NotFound
from quarkflow_core.images import probe_image
from quarkflow_core.outbox import Record, replay_dead_letters
from quarkflow_core.predictions import (
    FEEDBACK,
    PREDICTION,
    apply_records,
    latest_prediction,
    prediction_record,
)
from quarkflow_core.predictor import NoModel, read_pointer
from quarkflow_core.schema import Feedback, Image, ModelVersion, Prediction, ReviewItem, User
from quarkflow_core.service import ANONYMOUS, PredictionService

UNREACHABLE = "postgresql+psycopg2://qf:qf@127.0.0.1:9/quarkflow"  # nothing listens there
DIGITS = [str(i) for i in range(10)]
LAB = [f"d{i}" for i in range(10)]  # the lab project's classes: no label is also a digit's


def relabelled(src: Path, dest: Path) -> Path:
    """A copy of an artifact whose classes are the lab project's (same weights, new manifest
    and so a new sha256): its predictions can only be the lab model's."""
    shutil.copytree(src, dest)
    manifest = json.loads((dest / "manifest.json").read_text())
    manifest["classes"] = LAB
    (dest / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return dest


def register_in(dep, project_id: int, artifact: Path, *, approve: bool, tmp_path: Path):
    engine = dep.engine()
    try:
        with Session(engine, expire_on_commit=False) as s:
            row = registry.register_version(
                session=s,
                storage=dep.storage(),
                artifact_dir=artifact,
                created_by="t",
                project_id=project_id,
            )
            if approve:
                registry.approve(
                    session=s,
                    storage=dep.storage(),
                    version=row.version,
                    user=s.scalar(select(User).where(User.username == "lead")),
                    reason="the lab project's champion",
                    cache_root=tmp_path / "lead-cache",
                    override=True,
                    project_id=project_id,
                )
            return row.version
    finally:
        engine.dispose()


def make_lab(dep, *, seed: bool = False) -> int:
    """The ``lab`` project; ``seed``: with the demo digits (relabelled) as its seed data set, the
    hold-out a second champion is compared on."""
    engine = dep.engine()
    try:
        with Session(engine) as s:
            lab = projects.create_project(session=s, name="lab", classes=LAB, created_by="t")
            s.commit()
            if seed:
                pngs, labels = demo_pngs(SEED_SIZE)
                ingest_seed(
                    session=s,
                    storage=dep.storage(),
                    images=pngs,
                    labels=[f"d{label}" for label in labels],
                    classes=LAB,
                    annotator="mnist",
                    notes="the demo digits as the lab project's seed",
                    project_id=lab.id,
                )
                s.commit()
            return lab.id
    finally:
        engine.dispose()


@pytest.fixture
def two_projects(tmp_path, trained_artifacts):
    """default: the weak model (v1); lab: the strong one, relabelled (its own v1)."""
    dep = local_deploy(tmp_path, trained_artifacts["weak"])
    lab = make_lab(dep)
    artifact = relabelled(trained_artifacts["strong"], tmp_path / "lab-strong")
    register_in(dep, lab, artifact, approve=True, tmp_path=tmp_path)
    return dep, lab


@pytest.fixture
def service(two_projects):
    """The service with every project's champion loaded; no flusher thread (the tests flush)."""
    dep, _ = two_projects
    svc = PredictionService(dep.settings(review_rescore=False))
    svc.load_initial()
    yield svc
    svc.stop()


def flush(service: PredictionService) -> None:
    while service.flusher.flush_once():
        pass
    assert service.outbox.depth() == 0


def test_each_project_is_served_its_own_champion_and_keeps_its_rows(two_projects, service):
    dep, lab = two_projects
    assert lab == 2
    with service.session() as s:
        champions = {
            pid: registry.alias_of(session=s, alias=registry.CHAMPION, project_id=pid).sha256
            for pid in (1, lab)
        }
    served = {pid: service.current(pid) for pid in (1, lab)}
    assert {pid: p.sha256 for pid, p in served.items()} == champions
    assert champions[1] != champions[lab]
    assert served[1].classes == DIGITS and served[lab].classes == LAB
    assert served[1].version == served[lab].version == 1  # each project counts from v1
    assert service.holder is service.holders[1]  # the default project's, as before
    assert service.holder.current is served[1]

    expert = service.principal_for("expert")
    png = demo_pngs(1)[0][0]
    (mine,) = service.predict([(png, "image/png")], principal=expert, project_id=lab)
    (theirs,) = service.predict([(png, "image/png")], principal=expert)
    assert mine["label"] in LAB and theirs["label"] in DIGITS
    assert mine["model_version"] == theirs["model_version"] == 1
    assert mine["image_sha256"] == theirs["image_sha256"]
    assert service.outbox.find(mine["id"], PREDICTION).payload["project_id"] == lab
    assert service.outbox.find(theirs["id"], PREDICTION).payload["project_id"] == 1

    # found through its own project only: still in the outbox, then logged
    for logged in (False, True):
        assert service.get_prediction(mine["id"], project_id=lab)["logged"] is logged
        assert service.get_prediction(theirs["id"])["logged"] is logged
        with pytest.raises(NotFound):
            service.get_prediction(mine["id"])
        with pytest.raises(NotFound):
            service.get_prediction(theirs["id"], project_id=lab)
        flush(service)
    assert service.get_prediction(mine["id"], project_id=lab)["label"] == mine["label"]

    with Session(dep.engine()) as s:
        rows = {p.id: p for p in s.scalars(select(Prediction))}
        assert set(rows) == {mine["id"], theirs["id"]}
        for pred, pid in ((rows[mine["id"]], lab), (rows[theirs["id"]], 1)):
            assert pred.project_id == pid
            assert s.get(Image, pred.image_id).project_id == pid
            version = s.get(ModelVersion, pred.model_version_id)
            assert (version.project_id, version.version) == (pid, 1)  # not the other's v1
        # the same bytes: one image row per project, one stored blob
        images = s.scalars(select(Image).where(Image.sha256 == mine["image_sha256"])).all()
        assert sorted(i.project_id for i in images) == [1, lab]
        assert len({i.storage_key for i in images}) == 1
        for item in s.scalars(select(ReviewItem)):
            assert item.project_id == s.get(Image, item.image_id).project_id
        sha = mine["image_sha256"]
        assert latest_prediction(session=s, image_sha256=sha, project_id=lab).id == mine["id"]
        assert latest_prediction(session=s, image_sha256=sha).id == theirs["id"]


def test_feedback_is_checked_against_its_own_projects_prediction_and_classes(two_projects, service):
    dep, lab = two_projects
    expert = service.principal_for("expert")
    pngs, _ = demo_pngs(2)
    (mine,) = service.predict([(pngs[0], "image/png")], principal=expert, project_id=lab)
    (theirs,) = service.predict([(pngs[1], "image/png")], principal=expert)

    def feedback(pred_id, verdict, label, project_id):
        return service.feedback(
            pred_id,
            verdict=verdict,
            true_label=label,
            comment=None,
            principal=expert,
            project_id=project_id,
        )

    for _ in ("pending", "logged"):
        with pytest.raises(NotFound):
            feedback(theirs["id"], "correct", None, lab)
        with pytest.raises(NotFound):
            feedback(mine["id"], "correct", None, 1)
        flush(service)
    # a label of the other project's classes is not one of this project's
    with pytest.raises(InvalidInput) as refused:
        feedback(mine["id"], "wrong", "3", lab)
    assert refused.value.code == "unknown_label" and "d3" in refused.value.detail
    with pytest.raises(InvalidInput):
        feedback(theirs["id"], "wrong", "d3", 1)

    said = feedback(mine["id"], "wrong", "d3", lab)
    assert said["true_label"] == "d3" and said["durable"]
    assert feedback(theirs["id"], "wrong", "3", 1)["true_label"] == "3"
    assert service.outbox.find(said["id"], FEEDBACK).payload["project_id"] == lab
    flush(service)
    with Session(dep.engine()) as s:
        labels = dict(s.execute(select(Feedback.prediction_id, Feedback.true_label)).all())
        assert labels == {mine["id"]: "d3", theirs["id"]: "3"}
        item = s.scalar(
            select(ReviewItem)
            .join(Image, Image.id == ReviewItem.image_id)
            .where(Image.sha256 == mine["image_sha256"], Image.project_id == lab)
        )
        assert item.project_id == lab and item.resolved_label == "d3"

    # with the database down, the outbox vouches only for its own project's predictions
    assert service.outbox.known_label(mine["id"], project_id=lab) == mine["label"]
    assert service.outbox.known_label(mine["id"]) is None
    assert service.outbox.known_label(theirs["id"], project_id=lab) is None
    # and the database refuses a verdict that names the wrong project (a record fault)
    record = Record(
        0,
        FEEDBACK,
        "f-1",
        {
            "id": "f-1",
            "project_id": 1,
            "prediction_id": mine["id"],
            "verdict": "correct",
            "true_label": None,
            "comment": None,
            "user_id": None,
            "created_at": "2026-01-01T00:00:00+00:00",
        },
        None,
        0,
    )
    with service.session() as s, pytest.raises(NotFound):
        apply_records(s, service.storage, [record])


def test_outbox_records_keep_their_project_through_dead_letters_and_replay(two_projects, service):
    dep, lab = two_projects
    expert = service.principal_for("expert")
    pngs, _ = demo_pngs(2)
    (mine,) = service.predict([(pngs[0], "image/png")], principal=expert, project_id=lab)
    (record,) = service.outbox.peek()
    assert service.outbox.failed(record, "refused (test)", max_attempts=1)  # a dead letter
    (dead,) = service.outbox.dead()
    assert dead.payload["project_id"] == lab
    with service.session() as s:
        lead = s.scalar(select(User).where(User.username == "lead"))
        replayed = replay_dead_letters(session=s, outbox=service.outbox, user=lead, ids=None)
    assert replayed == [dead.id]
    flush(service)
    assert service.get_prediction(mine["id"], project_id=lab)["logged"] is True

    # a record written before projects (no project_id) is the default project's
    with service.session() as s:
        predictor = service.current(1)
        old = prediction_record(
            summary={
                "label": "7",
                "confidence": 0.99,
                "topk": [{"label": "7", "confidence": 0.99}],
                "margin": 0.98,
                "entropy": 0.01,
            },
            info=probe_image(pngs[1]),
            model_version=predictor.version,
            latency_ms=1.0,
            review_threshold=0.5,
        )
        del old["project_id"]
        apply_records(s, service.storage, [Record(0, PREDICTION, old["id"], old, pngs[1], 0)])
    with Session(dep.engine()) as s:
        projects_of = dict(s.execute(select(Prediction.id, Prediction.project_id)).all())
        assert projects_of == {mine["id"]: lab, old["id"]: 1}
        per_project = dict(
            s.execute(select(Image.project_id, func.count()).group_by(Image.project_id)).all()
        )
        assert per_project == {1: 1, lab: 1}


def test_champions_are_found_per_project_lazily_and_from_pointers(tmp_path, trained_artifacts):
    dep = local_deploy(tmp_path, trained_artifacts["weak"])
    lab = make_lab(dep, seed=True)
    first = relabelled(trained_artifacts["strong"], tmp_path / "lab-1")
    second = relabelled(trained_artifacts["strong_b"], tmp_path / "lab-2")
    register_in(dep, lab, first, approve=False, tmp_path=tmp_path)
    settings = dep.settings(review_rescore=False, model_poll_s=0.2)
    service = PredictionService(settings)
    png = demo_pngs(1)[0][0]
    try:
        service.load_initial()
        expert = service.principal_for("expert")
        assert service.current(lab) is None
        with pytest.raises(NoModel) as none:
            service.predict([(png, None)], principal=expert, project_id=lab)
        assert "project lab" in none.value.detail
        report = service.readiness()
        assert report["ready"] is True
        assert report["checks"]["model"]["version"] == 1  # the default project's, as before
        assert report["checks"]["projects"]["default"]["version"] == 1
        assert report["checks"]["projects"]["lab"]["ok"] is False

        # approved: the next request loads it (no watcher running, no refresh called)
        engine = dep.engine()
        with Session(engine, expire_on_commit=False) as s:
            registry.approve(
                session=s,
                storage=dep.storage(),
                version=1,
                user=s.scalar(select(User).where(User.username == "lead")),
                reason="the lab project's first champion",
                cache_root=tmp_path / "lead-cache",
                override=True,
                project_id=lab,
            )
        engine.dispose()
        default_model = service.current(1)

        def lazily():
            return service.predict([(png, None)], principal=expert, project_id=lab)[0]

        first_answer = wait_until(lazily, timeout=10, what="the lab champion, loaded lazily")
        assert first_answer["label"] in LAB and first_answer["model_version"] == 1
        assert service.readiness()["checks"]["projects"]["lab"]["version"] == 1

        # the watcher's poll: a new lab champion swaps in; the default project's stays put
        assert service.refresh_model() is False
        register_in(dep, lab, second, approve=True, tmp_path=tmp_path)
        assert service.refresh_model() is True
        assert service.current(lab).version == 2 and service.current(1) is default_model
        assert read_pointer(service.pointer)["version"] == 1  # serving/current.json: default
        lab_pointer = read_pointer(service.models.pointer(lab))
        assert (lab_pointer["version"], lab_pointer["project"]) == (2, "lab")
        assert service.models.pointer(lab) != service.pointer
        flush(service)
    finally:
        service.stop()

    # the database is down at start: each project serves what it served last
    down = PredictionService(settings, database_url=UNREACHABLE)
    try:
        started = time.monotonic()
        down.load_initial()
        assert time.monotonic() - started < 60
        assert down.current(1).version == 1 and down.current(lab).version == 2
        assert down.current(lab).classes == LAB
        (answer,) = down.predict([(png, None)], principal=ANONYMOUS, project_id=lab)
        assert answer["label"] in LAB and answer["model_version"] == 2
        assert down.readiness()["checks"]["projects"]["lab"]["version"] == 2
        assert down.outbox.find(answer["id"], PREDICTION).payload["project_id"] == lab
    finally:
        down.stop()

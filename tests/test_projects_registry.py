"""The registry, datasets, labels, training runs and the retrain pipeline per project, on SQLite
and Postgres: two projects (``default`` and ``birds``, both seeded with the demo digits) number
their versions from v1, have their own champion, challenger, history and rollback stack, their
own snapshots, runs and labels, and never see each other's rows; a per-project grant makes a
user an ML lead in one project only."""

from __future__ import annotations

import shutil
from datetime import UTC, datetime

import pytest
from helpers.data import SEED_SIZE
from sqlalchemy import select

from quarkflow_core import pipeline, projects, registry
from quarkflow_core.datasets import (
    MemberSpec,
    create_snapshot,
    get_snapshot,
    list_snapshots,
    snapshot_items,
)
from quarkflow_core.demo_data import seed_demo
from quarkflow_core.errors import InvalidInput, NotFound, PermissionDenied
from quarkflow_core.labels import build_training_snapshot, new_labels_since, resolve_labels
from quarkflow_core.ml.train import TrainConfig
from quarkflow_core.registry import PolicyConfig
from quarkflow_core.schema import (
    DEFAULT_PROJECT_ID,
    AuditLog,
    DatasetMember,
    Feedback,
    Image,
    Prediction,
    PromotionAction,
    Role,
    Split,
    TrainingRun,
    Verdict,
)
from quarkflow_core.storage import LocalStorage
from quarkflow_core.training_runs import default_snapshot_id, train_from_snapshot
from quarkflow_core.users import create_user

pytestmark = pytest.mark.integration
DIGITS = [str(d) for d in range(10)]
LOOSE = PolicyConfig(max_class_recall_drop=0.3, max_ece_increase=0.3)
D = DEFAULT_PROJECT_ID


@pytest.fixture
def env(db_session, tmp_path):
    """The default project and ``birds``, each seeded with the same demo digits (two sets of
    image rows, one set of blobs); a global ML lead, and ``robin``: an analyst who is the ML
    lead of ``birds`` only."""
    s = db_session
    storage = LocalStorage(tmp_path / "store")
    seed_demo(session=s, storage=storage, limit=SEED_SIZE)
    birds = projects.create_project(session=s, name="birds", classes=DIGITS)
    seed_demo(session=s, storage=storage, limit=SEED_SIZE, project_id=birds.id)
    lead = create_user(session=s, username="lead", role=Role.ML_LEAD)
    robin = create_user(session=s, username="robin", role=Role.ANALYST)
    projects.grant(session=s, project_id=birds.id, user=robin, role=Role.ML_LEAD, granted_by="t")
    s.commit()
    return {
        "session": s,
        "storage": storage,
        "birds": birds.id,
        "lead": lead,
        "robin": robin,
        "cache": tmp_path / "cache",
    }


def _register(env, folder, project_id, **kw):
    return registry.register_version(
        session=env["session"],
        storage=env["storage"],
        artifact_dir=folder,
        created_by="t",
        project_id=project_id,
        **kw,
    )


def _approve(env, version, project_id, user="lead", **kw):
    kw.setdefault("config", LOOSE)
    return registry.approve(
        session=env["session"],
        storage=env["storage"],
        version=version,
        user=env[user],
        reason="better on the hold-out",
        cache_root=env["cache"],
        project_id=project_id,
        **kw,
    )


def _audit(session, action, outcome):
    q = select(AuditLog).where(AuditLog.action == action, AuditLog.outcome == outcome)
    return session.scalars(q.order_by(AuditLog.id)).all()


def test_versions_are_numbered_and_looked_up_per_project(env, trained_artifacts):
    s, birds = env["session"], env["birds"]
    d1 = _register(env, trained_artifacts["weak"], D)
    b1 = _register(env, trained_artifacts["strong"], birds)
    d2 = _register(env, trained_artifacts["strong"], D)
    b2 = _register(env, trained_artifacts["weak"], birds)
    assert [(r.version, r.project_id) for r in (d1, b1, d2, b2)] == [
        (1, D),
        (1, birds),
        (2, D),
        (2, birds),
    ]
    assert d2.sha256 == b1.sha256 and d2.id != b1.id  # one artifact, a version in each
    assert _register(env, trained_artifacts["weak"], birds).id == b2.id  # idempotent in birds
    assert [r.id for r in registry.list_versions(session=s)] == [d1.id, d2.id]
    assert [r.id for r in registry.list_versions(session=s, project_id=birds)] == [b1.id, b2.id]
    assert registry.get_version(session=s, ref="v2", project_id=birds).id == b2.id
    assert registry.get_version(session=s, ref=2).id == d2.id
    # another project's version is not found, exactly like an unknown one
    for ref in (d1, d2):
        with pytest.raises(NotFound, match=f"no model version v{ref.version}"):
            registry.get_version(session=s, ref=ref, project_id=birds)
    with pytest.raises(NotFound, match="no model version v3"):
        registry.get_version(session=s, ref=3, project_id=birds)
    registered = _audit(s, "models.register", "ok")
    assert [a.detail["project_id"] for a in registered] == [D, birds, D, birds]


def test_a_project_without_classes_takes_its_first_versions(env, trained_artifacts):
    s = env["session"]
    empty = projects.create_project(session=s, name="empty", classes=["a", "b"])
    empty.classes = []  # as the default project of an installation with no model yet
    s.commit()
    _register(env, trained_artifacts["weak"], empty.id)
    assert projects.get_project(session=s, ref="empty").classes == DIGITS
    assert projects.get_project(session=s, ref="birds").classes == DIGITS


def test_champions_history_and_rollback_are_per_project(env, trained_artifacts):
    s, storage, birds, lead = env["session"], env["storage"], env["birds"], env["lead"]
    d1 = _register(env, trained_artifacts["weak"], D)
    d2 = _register(env, trained_artifacts["strong"], D)
    b1 = _register(env, trained_artifacts["strong"], birds)
    before = datetime.now(UTC)
    _approve(env, d1, D)
    _approve(env, b1, birds)
    b2 = _register(env, trained_artifacts["weak"], birds, as_challenger=True)
    _approve(env, "v2", D)
    assert registry.alias_of(session=s, alias="champion").id == d2.id
    assert registry.alias_of(session=s, alias="champion", project_id=birds).id == b1.id
    assert registry.get_version(session=s, ref="challenger", project_id=birds).id == b2.id
    with pytest.raises(NotFound, match="no challenger"):
        registry.get_version(session=s, ref="challenger")
    assert {a: r.id for a, r in registry.aliases(session=s).items()} == {"champion": d2.id}
    assert {a: r.id for a, r in registry.aliases(session=s, project_id=birds).items()} == {
        "champion": b1.id,
        "challenger": b2.id,
    }

    # the histories are the projects' own, and so are champion_at and the champion stack
    def moves(project_id):
        return [
            (e.action.value, e.alias, e.from_version_id, e.to_version_id, e.project_id)
            for e in registry.history(session=s, project_id=project_id)
        ]

    assert moves(D) == [
        ("approve", "champion", None, d1.id, D),
        ("approve", "champion", d1.id, d2.id, D),
    ]
    assert moves(birds) == [
        ("approve", "champion", None, b1.id, birds),
        ("set_challenger", "challenger", None, b2.id, birds),
    ]
    assert registry.champion_stack(session=s) == [d1.id, d2.id]
    assert registry.champion_stack(session=s, project_id=birds) == [b1.id]
    assert registry.champion_at(session=s, when=before, project_id=birds) is None
    assert registry.champion_at(session=s, when=datetime.now(UTC), project_id=birds).id == b1.id
    assert registry.champion_at(session=s, when=datetime.now(UTC)).id == d2.id

    # birds' candidate is judged against birds' champion, on birds' hold-out
    proposal = registry.propose(
        session=s, storage=storage, ref="challenger", cache_root=env["cache"], project_id=birds
    )
    assert proposal.champion.id == b1.id
    birds_seed = default_snapshot_id(session=s, project_id=birds)
    assert (
        proposal.evidence["comparison"]["snapshot_id"]
        == birds_seed
        != default_snapshot_id(session=s)
    )
    with pytest.raises(NotFound):  # not birds' version
        _approve(env, d1, birds)

    # rollback walks the project's own stack: birds has had one champion only
    with pytest.raises(InvalidInput, match="first champion"):
        registry.rollback(session=s, storage=storage, user=lead, reason="x y z", project_id=birds)
    with pytest.raises(NotFound):
        registry.rollback(
            session=s, storage=storage, user=lead, reason="x y z", to=d1, project_id=birds
        )
    back = registry.rollback(session=s, storage=storage, user=lead, reason="v2 misbehaves")
    assert (back.project_id, back.from_version_id, back.to_version_id) == (D, d2.id, d1.id)
    assert registry.alias_of(session=s, alias="champion", project_id=birds).id == b1.id

    # rejecting birds' challenger leaves the default project alone
    with pytest.raises(NotFound):
        registry.reject(session=s, version=d2, user=lead, reason="worse", project_id=birds)
    rejected = registry.reject(
        session=s, version="challenger", user=lead, reason="worse", project_id=birds
    )
    assert rejected.action == PromotionAction.REJECT and rejected.project_id == birds
    assert "challenger" not in registry.aliases(session=s, project_id=birds)
    assert len(registry.history(session=s)) == 3 and len(moves(birds)) == 3
    assert {a.detail["project_id"] for a in _audit(s, "models.rollback", "ok")} == {D}
    assert [a.detail["project_id"] for a in _audit(s, "models.reject", "ok")] == [birds]


def test_a_grant_makes_an_ml_lead_in_one_project_only(env, trained_artifacts):
    s, birds = env["session"], env["birds"]
    d1 = _register(env, trained_artifacts["weak"], D)
    b1 = _register(env, trained_artifacts["weak"], birds)
    event = _approve(env, b1, birds, user="robin")  # ml_lead in birds by grant
    assert event.actor == "robin" and event.project_id == birds
    (ok,) = _audit(s, "models.approve", "ok")
    assert ok.actor == "robin" and ok.detail["project_id"] == birds
    with pytest.raises(PermissionDenied, match="needs role ml_lead; robin is analyst"):
        _approve(env, d1, D, user="robin")  # an analyst everywhere else
    (denied,) = _audit(s, "models.approve", "denied")
    assert denied.actor == "robin" and denied.detail["project_id"] == D
    assert denied.detail["role"] == "analyst"
    assert registry.alias_of(session=s, alias="champion") is None
    # the reverse: a global ML lead made an analyst in birds is refused there only
    projects.grant(session=s, project_id=birds, user=env["lead"], role=Role.ANALYST, granted_by="t")
    s.commit()
    for refused in (
        lambda: registry.rollback(
            session=s, storage=env["storage"], user=env["lead"], reason="x y z", project_id=birds
        ),
        lambda: registry.reject(
            session=s, version=b1, user=env["lead"], reason="x y z", project_id=birds
        ),
    ):
        with pytest.raises(PermissionDenied, match="lead is analyst"):
            refused()
    denied = _audit(s, "models.rollback", "denied") + _audit(s, "models.reject", "denied")
    assert [(d.actor, d.detail["project_id"]) for d in denied] == [("lead", birds)] * 2
    assert _approve(env, d1, D).actor == "lead"


def test_snapshots_and_training_runs_are_per_project(env, tmp_path):
    s, storage, birds = env["session"], env["storage"], env["birds"]
    (d_seed,) = list_snapshots(session=s)
    (b_seed,) = list_snapshots(session=s, project_id=birds)
    assert (d_seed.project_id, b_seed.project_id) == (D, birds)
    assert d_seed.content_hash == b_seed.content_hash and d_seed.id != b_seed.id
    assert default_snapshot_id(session=s, project_id=birds) == b_seed.id
    with pytest.raises(NotFound, match=f"no dataset snapshot with id {d_seed.id}"):
        get_snapshot(session=s, snapshot_id=d_seed.id, project_id=birds)
    with pytest.raises(NotFound):
        snapshot_items(session=s, snapshot_id=b_seed.id)
    birds_images = set(s.scalars(select(Image.id).where(Image.project_id == birds)))
    items = snapshot_items(session=s, snapshot_id=b_seed.id, project_id=birds)
    assert len(items) == SEED_SIZE and {i.image_id for i in items} == birds_images
    # a snapshot lists only the project's own images
    d_image = s.scalar(select(Image).where(Image.project_id == D).limit(1))
    with pytest.raises(NotFound, match=f"no image with id {d_image.id}"):
        create_snapshot(
            session=s,
            name="mixed",
            members=[MemberSpec(d_image.id, d_image.sha256, "0", Split.TRAIN)],
            classes=DIGITS,
            project_id=birds,
        )

    config = TrainConfig(epochs=1, batch_size=64, augment="none", num_threads=2)
    with pytest.raises(NotFound):  # the default project's snapshot, trained in birds
        train_from_snapshot(
            session=s,
            storage=storage,
            snapshot_id=d_seed.id,
            config=config,
            out_dir=tmp_path / "no",
            project_id=birds,
        )
    assert s.scalar(select(TrainingRun.id)) is None
    outcome = train_from_snapshot(
        session=s,
        storage=storage,
        snapshot_id=b_seed.id,
        config=config,
        out_dir=tmp_path / "birds-run",
        project_id=birds,
    )
    run = s.get(TrainingRun, outcome.run_id)
    assert (run.project_id, run.snapshot_id, run.status.value) == (birds, b_seed.id, "succeeded")
    # registered in birds the version links its run and snapshot; in the default project the
    # same artifact does not (they are birds')
    b1 = _register(env, outcome.artifact_dir, birds)
    d1 = _register(env, outcome.artifact_dir, D)
    assert (b1.training_run_id, b1.snapshot_id) == (run.id, b_seed.id)
    assert (d1.training_run_id, d1.snapshot_id) == (None, None)
    lin = registry.lineage(session=s, row=b1)
    assert lin["training_run"]["id"] == run.id and lin["snapshot"]["id"] == b_seed.id


def test_labels_and_retrain_snapshots_are_per_project(env):
    s, birds = env["session"], env["birds"]
    (d_seed,) = list_snapshots(session=s)
    (b_seed,) = list_snapshots(session=s, project_id=birds)
    # an expert says a default-project prediction of a seed training image was wrong
    image_id, seed_label = s.execute(
        select(DatasetMember.image_id, DatasetMember.label)
        .where(DatasetMember.snapshot_id == d_seed.id, DatasetMember.split == Split.TRAIN)
        .order_by(DatasetMember.image_id)
        .limit(1)
    ).one()
    true_label = next(c for c in DIGITS if c != seed_label)
    pred = Prediction(
        project_id=D, image_id=image_id, label=seed_label, confidence=0.6, latency_ms=1.0
    )
    s.add(pred)
    s.flush()
    s.add(Feedback(prediction_id=pred.id, verdict=Verdict.WRONG, true_label=true_label))
    s.flush()
    assert new_labels_since(session=s)["per_class"] == {true_label: 1}
    assert new_labels_since(session=s, project_id=birds)["total"] == 0
    birds_images = set(s.scalars(select(Image.id).where(Image.project_id == birds)))
    birds_labels = resolve_labels(session=s, project_id=birds)
    assert set(birds_labels.labels) == birds_images
    assert set(birds_labels.source.values()) == {"seed"}
    default_labels = resolve_labels(session=s)
    assert default_labels.labels[image_id] == true_label
    assert not set(default_labels.labels) & birds_images

    # birds has nothing new: its retrain snapshot is its seed snapshot
    snap_id, created, report = build_training_snapshot(session=s, project_id=birds)
    assert (snap_id, created, report["sources"]) == (b_seed.id, False, {"seed": 480})
    # the default project's carries the feedback, grows from its own seed
    d_snap, created, d_report = build_training_snapshot(session=s)
    assert created and d_report["sources"] == {"seed": 479, "feedback": 1}
    snap = get_snapshot(session=s, snapshot_id=d_snap)
    assert (snap.project_id, snap.parent_id) == (D, d_seed.id)
    with pytest.raises(NotFound):
        get_snapshot(session=s, snapshot_id=d_snap, project_id=birds)
    assert new_labels_since(session=s)["total"] == 0  # counted from the new snapshot
    assert [x.id for x in list_snapshots(session=s, project_id=birds)] == [b_seed.id]


def test_the_retrain_pipeline_registers_and_finds_candidates_per_project(
    env, trained_artifacts, tmp_path
):
    s, storage, birds = env["session"], env["storage"], env["birds"]
    folder = tmp_path / "candidate"
    shutil.copytree(trained_artifacts["weak"], folder)
    spec = pipeline.RetrainSpec(epochs=1)
    snap_id = default_snapshot_id(session=s, project_id=birds)
    key = pipeline.snapshot_key(session=s, snapshot_id=snap_id, spec=spec, project_id=birds)
    with pytest.raises(NotFound):
        pipeline.snapshot_key(session=s, snapshot_id=snap_id, spec=spec)
    judged = pipeline.register_step(
        session=s,
        storage=storage,
        key=key,
        artifact_dir=str(folder),
        parent_dir=None,
        actor="flow:retrain",
        cache_root=env["cache"],
        policy=LOOSE,
        project_id=birds,
    )
    assert judged["version"] == 1 and judged["champion"] is None
    row = pipeline.existing_candidate(session=s, key=key, project_id=birds)
    assert row is not None and row.project_id == birds
    assert pipeline.existing_candidate(session=s, key=key) is None
    assert registry.alias_of(session=s, alias="challenger", project_id=birds).id == row.id
    assert registry.aliases(session=s) == {} and registry.list_versions(session=s) == []
    md = pipeline.report_markdown({"project": "birds", "candidate": judged})
    assert "in project birds" in md and "quarkflow --project birds models approve v1" in md
    assert "--project" not in pipeline.report_markdown({"candidate": judged})

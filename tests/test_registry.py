"""Model registry and promotion, on SQLite and Postgres, with real models scored on real
MNIST digits (the demo set)."""

from __future__ import annotations

import itertools
import threading
import time
from datetime import UTC, datetime

import numpy as np
import pytest
import torch
from helpers.data import SEED_SIZE
from sqlalchemy import select, text
from sqlalchemy.orm import Session

from quarkflow_core import migrations, registry
from quarkflow_core.database import make_engine
from quarkflow_core.demo_data import (
    DEMO_LEAD,
    bootstrap_champion,
    seed_demo,
)
from quarkflow_core.errors import Conflict, InvalidInput, NotFound, PermissionDenied, StorageError
from quarkflow_core.ml.artifacts import ArtifactIntegrityError
from quarkflow_core.ml.compare import compare
from quarkflow_core.ml.train import TrainConfig
from quarkflow_core.ml.transforms import eval_preset
from quarkflow_core.registry import PolicyConfig, evaluate_policy
from quarkflow_core.schema import AuditLog, ModelVersion, PromotionAction, PromotionEvent, Role
from quarkflow_core.storage import LocalStorage
from quarkflow_core.users import create_user

PRESET = eval_preset("digits28")
# Thresholds loose enough that "better" on 120 hold-out images passes; the strict defaults
# are exercised by the policy unit tests below.
LOOSE = PolicyConfig(max_class_recall_drop=0.3, max_ece_increase=0.3)

pytestmark = pytest.mark.integration


# --------------------------------------------------------------------------- artifacts


@pytest.fixture(scope="module")
def artifacts(trained_artifacts):
    return trained_artifacts


@pytest.fixture
def env(db_session, tmp_path):
    """Seeded database + local storage + users of every role."""
    storage = LocalStorage(tmp_path / "store")
    seed_demo(session=db_session, storage=storage, limit=SEED_SIZE)
    users = {
        role: create_user(session=db_session, username=f"u-{role.value}", role=role)
        for role in Role
    }
    users["lead2"] = create_user(session=db_session, username="u-lead2", role=Role.ML_LEAD)
    db_session.commit()
    return {"session": db_session, "storage": storage, "users": users, "cache": tmp_path / "c"}


def _register(env, folder, **kw):
    return registry.register_version(
        session=env["session"], storage=env["storage"], artifact_dir=folder, created_by="t", **kw
    )


def _approve(env, version, user=Role.ML_LEAD, reason="better on the hold-out", **kw):
    kw.setdefault("config", LOOSE)
    return registry.approve(
        session=env["session"],
        storage=env["storage"],
        version=version,
        user=env["users"][user],
        reason=reason,
        cache_root=env["cache"],
        **kw,
    )


def _audit(session, action, outcome):
    return session.scalars(
        select(AuditLog).where(AuditLog.action == action, AuditLog.outcome == outcome)
    ).all()


# --------------------------------------------------------------------------- register


def test_register_uploads_files_and_is_idempotent(env, artifacts):
    s, storage = env["session"], env["storage"]
    v1 = _register(env, artifacts["weak"])
    assert v1.version == 1 and v1.artifact_key == f"models/{v1.sha256}"
    stored = set(storage.list(v1.artifact_key + "/"))
    assert {f"{v1.artifact_key}/manifest.json", f"{v1.artifact_key}/weights.pt"} <= stored
    assert _register(env, artifacts["weak"]).id == v1.id  # same artifact -> same version
    v2 = _register(env, artifacts["strong"], as_challenger=True)
    assert v2.version == 2
    assert registry.get_version(session=s, ref="challenger").id == v2.id
    assert registry.get_version(session=s, ref="v1").id == v1.id
    assert [v.version for v in registry.list_versions(session=s)] == [1, 2]
    with pytest.raises(NotFound, match="no model version v9"):
        registry.get_version(session=s, ref=9)
    with pytest.raises(NotFound, match="no champion"):
        registry.get_version(session=s, ref="champion")
    with pytest.raises(InvalidInput, match="not a version"):
        registry.get_version(session=s, ref="latest")


def test_versions_are_immutable_in_the_database(env, artifacts):
    s = env["session"]
    v1 = _register(env, artifacts["weak"])
    with pytest.raises(Exception, match=r"append-only|immutable"):
        s.execute(text("UPDATE model_versions SET sha256 = 'x' WHERE id = :i"), {"i": v1.id})
    s.rollback()


def test_crash_during_upload_leaves_no_version(env, artifacts, monkeypatch):
    s, storage = env["session"], env["storage"]
    real_put = storage.put

    def failing_put(key, data, **kw):
        if key.endswith("manifest.json"):
            raise StorageError("simulated outage")
        return real_put(key, data, **kw)

    monkeypatch.setattr(storage, "put", failing_put)
    with pytest.raises(StorageError):
        _register(env, artifacts["weak"])
    assert s.scalar(select(ModelVersion.id)) is None
    monkeypatch.setattr(storage, "put", real_put)
    assert _register(env, artifacts["weak"]).version == 1  # the retry completes it


def test_lineage_snapshot_run_version_parent(env, tmp_path):
    from quarkflow_core.ml.artifacts import load_artifact
    from quarkflow_core.ml.data import load_snapshot
    from quarkflow_core.ml.variants import prune_artifact
    from quarkflow_core.schema import Split
    from quarkflow_core.training_runs import default_snapshot_id, train_from_snapshot

    s, storage = env["session"], env["storage"]
    snap = default_snapshot_id(session=s)
    outcome = train_from_snapshot(
        session=s,
        storage=storage,
        snapshot_id=snap,
        config=TrainConfig(epochs=2, batch_size=64, augment="none", num_threads=2),
        out_dir=tmp_path / "trained",
    )
    parent = _register(env, outcome.artifact_dir)
    data = load_snapshot(session=s, storage=storage, snapshot_id=snap, preset=PRESET)
    prune_artifact(
        load_artifact(outcome.artifact_dir),
        train=data[Split.TRAIN],
        holdout=data[Split.HOLDOUT],
        ratio=0.5,
        recover_epochs=1,
        out_dir=tmp_path / "pruned",
    )
    child = _register(env, tmp_path / "pruned")
    lin = registry.lineage(session=s, row=child)
    assert lin["snapshot"]["id"] == snap and lin["training_run"]["id"] == outcome.run_id
    assert lin["training_run"]["status"] == "succeeded"
    assert lin["parents"] == [{"version": parent.version, "sha256": parent.sha256}]
    assert registry.lineage(session=s, row=parent)["children"] == [child.version]
    assert parent.metrics["accuracy"] == outcome.metrics["holdout"]["accuracy"]
    # the pruning trade-off is part of the parent's evidence
    evidence = registry.propose(session=s, storage=storage, ref=parent, cache_root=env["cache"])
    variants = evidence.evidence["pruning"]["variants"]
    assert variants[0]["version"] == child.version and variants[0]["pruning"]["ratio"] == 0.5


# --------------------------------------------------------------------------- policy (unit)


def _report(acc_a, acc_b, n=1000, seed=0, conf=0.9, class_shift=None, conf_b=None):
    """Synthetic but exact: two classifiers with given accuracies on n balanced items."""
    rng = np.random.default_rng(seed)
    labels = torch.tensor(np.arange(n) % 2)

    def probs(acc, shift_class=None, conf=conf):
        ok = rng.random(n) < acc
        if shift_class is not None:
            ok[labels.numpy() == shift_class] &= rng.random(int(n / 2)) < 0.8
        pred = np.where(ok, labels.numpy(), 1 - labels.numpy())
        p = np.full((n, 2), 1 - conf)
        p[np.arange(n), pred] = conf
        return torch.tensor(p, dtype=torch.float32)

    b = probs(acc_b, class_shift, conf if conf_b is None else conf_b)
    return compare(labels, probs(acc_a), b, ["cat", "dog"])


@pytest.mark.unit
def test_policy_passes_a_significantly_better_candidate():
    verdict = evaluate_policy(_report(0.80, 0.92, conf=0.86), PolicyConfig(max_ece_increase=0.1))
    assert verdict.passed and verdict.verdict == "pass"
    assert "significantly better" in verdict.checks[0]["detail"]


@pytest.mark.unit
def test_policy_fails_a_worse_candidate_and_says_why():
    verdict = evaluate_policy(_report(0.92, 0.80), PolicyConfig())
    assert not verdict.passed and verdict.verdict == "fail"
    assert any(r.startswith("significantly worse") for r in verdict.reasons)


@pytest.mark.unit
def test_policy_names_the_class_whose_recall_drops():
    report = _report(0.90, 0.90, class_shift=1, seed=3)
    verdict = evaluate_policy(report, PolicyConfig(noninferiority_margin=1.0))
    failed = {c["name"] for c in verdict.checks if not c["passed"]}
    assert "class_recall" in failed
    assert "dog" in verdict.checks[1]["detail"]


@pytest.mark.unit
def test_policy_fails_worse_calibration_and_has_no_opinion_without_champion():
    # same accuracy, but the candidate says 99% when it is right 90% of the time
    report = _report(0.9, 0.9, conf_b=0.99)
    assert report["ece_delta"] > 0.05 and report["ece_delta_ci95"][0] > 0
    lenient = PolicyConfig(noninferiority_margin=1.0, max_class_recall_drop=1.0)
    verdict = evaluate_policy(report, lenient)
    assert [c["name"] for c in verdict.checks if not c["passed"]] == ["calibration"]
    assert "calibration significantly worse" in verdict.checks[2]["detail"]
    # the same point increase on 40 images is within the noise of the hold-out: no failure
    small = _report(0.9, 0.9, n=40, conf_b=0.95)
    noisy = evaluate_policy(small, lenient)
    assert small["ece_delta_ci95"][0] <= 0 and noisy.checks[2]["passed"]
    none = evaluate_policy(None, PolicyConfig())
    assert none.passed and none.verdict == "no_champion"


# --------------------------------------------------------------------------- decisions


def test_approve_moves_champion_with_frozen_evidence(env, artifacts, db_engine):
    s = env["session"]
    weak = _register(env, artifacts["weak"])
    first = _approve(env, weak, reason="first model")
    assert first.from_version_id is None and first.policy_verdict == "no_champion"
    strong = _register(env, artifacts["strong"], as_challenger=True)
    event = _approve(env, "challenger")
    assert registry.get_version(session=s, ref="champion").id == strong.id
    assert "challenger" not in registry.aliases(session=s)  # the challenger was promoted
    assert event.action == PromotionAction.APPROVE and event.actor == "u-ml_lead"
    assert (event.from_version_id, event.to_version_id) == (weak.id, strong.id)
    assert event.policy_verdict == "pass"
    ev = event.evidence
    assert ev["comparison"]["verdict"] == "better" and ev["comparison"]["n"] == 120
    assert ev["comparison"]["accuracy_b"] > ev["comparison"]["accuracy_a"]
    assert ev["champion"]["version"] == 1 and ev["candidate"]["version"] == 2
    assert set(ev["comparison"]["per_class"]) == {str(d) for d in range(10)}
    # the hash survives the database round trip (JSONB on Postgres reorders keys)
    with Session(bind=s.connection()) as fresh:
        stored = fresh.get(PromotionEvent, event.id, populate_existing=True)
        assert registry.verify_event(stored)
    ok = _audit(s, "models.approve", "ok")
    assert len(ok) == 2 and ok[-1].detail["evidence_sha256"] == event.evidence_sha256


def test_an_analyst_cannot_approve_and_the_refusal_is_audited(env, artifacts):
    s = env["session"]
    v1 = _register(env, artifacts["weak"])
    for role in (Role.ANALYST, Role.DOMAIN_EXPERT):
        with pytest.raises(PermissionDenied, match="needs role ml_lead"):
            _approve(env, v1, user=role)
    denied = _audit(s, "models.approve", "denied")
    assert {d.actor for d in denied} == {"u-analyst", "u-domain_expert"}
    assert registry.alias_of(session=s, alias="champion") is None
    assert _approve(env, v1, user=Role.ADMIN).actor == "u-admin"  # admin may do anything


def test_reasons_are_required_and_a_failing_policy_needs_a_written_override(env, artifacts):
    s = env["session"]
    strong = _register(env, artifacts["strong"])
    weak = _register(env, artifacts["weak"])
    with pytest.raises(InvalidInput, match="reason"):
        _approve(env, strong, reason=" ")
    _approve(env, strong)
    with pytest.raises(InvalidInput, match="policy fails v2") as err:
        _approve(env, weak)
    assert err.value.code == "policy_failed"
    assert "significantly worse" in err.value.detail
    assert _audit(s, "models.approve", "refused")[-1].detail["why"].startswith("policy failed")
    with pytest.raises(InvalidInput, match="at least 20 characters"):
        _approve(env, weak, override=True, reason="because")
    event = _approve(
        env, weak, override=True, reason="cheaper model, accuracy loss accepted by product"
    )
    assert event.policy_verdict == "fail (overridden)"
    assert registry.get_version(session=s, ref="champion").id == weak.id
    with pytest.raises(InvalidInput, match="already the champion"):
        _approve(env, weak)


def test_reject_clears_the_challenger(env, artifacts):
    s = env["session"]
    champ = _register(env, artifacts["strong"])
    _approve(env, champ)
    cand = _register(env, artifacts["weak"], as_challenger=True)
    with pytest.raises(PermissionDenied):
        registry.reject(session=s, version=cand, user=env["users"][Role.ANALYST], reason="no")
    event = registry.reject(
        session=s, version="challenger", user=env["users"][Role.ML_LEAD], reason="worse"
    )
    assert event.action == PromotionAction.REJECT and event.from_version_id == cand.id
    assert "challenger" not in registry.aliases(session=s)
    with pytest.raises(InvalidInput, match="roll back"):
        registry.reject(session=s, version=champ, user=env["users"][Role.ML_LEAD], reason="x y")


def test_rollback_and_history_at_a_time_between_promotions(env, artifacts):
    s, storage = env["session"], env["storage"]
    lead = env["users"][Role.ML_LEAD]
    v1 = _register(env, artifacts["weak"])
    v2 = _register(env, artifacts["strong"])
    v3 = _register(env, artifacts["strong_b"])
    before_any = datetime.now(UTC)
    time.sleep(0.01)
    _approve(env, v1)
    time.sleep(0.01)
    between = datetime.now(UTC)
    time.sleep(0.01)
    _approve(env, v2)
    _approve(env, v3, override=True, reason="seed 1 is as good; exercising the override")
    with pytest.raises(PermissionDenied):
        registry.rollback(session=s, storage=storage, user=env["users"][Role.ANALYST], reason="x")
    back = registry.rollback(session=s, storage=storage, user=lead, reason="v3 misbehaves")
    assert back.action == PromotionAction.ROLLBACK
    assert (back.from_version_id, back.to_version_id) == (v3.id, v2.id)
    again = registry.rollback(session=s, storage=storage, user=lead, reason="v2 too")
    assert again.to_version_id == v1.id  # walks back through the champions, not v3 again
    with pytest.raises(InvalidInput, match="first champion"):
        registry.rollback(session=s, storage=storage, user=lead, reason="nothing before v1")
    to_any = registry.rollback(session=s, storage=storage, user=lead, reason="pick v3", to="v3")
    assert to_any.to_version_id == v3.id

    assert registry.champion_at(session=s, when=before_any) is None
    assert registry.champion_at(session=s, when=between).id == v1.id
    assert registry.champion_at(session=s, when=datetime.now(UTC)).id == v3.id
    events = [
        registry.event_dict(session=s, event=e)
        for e in registry.history(session=s, alias="champion")
    ]
    assert [(e["action"], e["from_version"], e["to_version"]) for e in events] == [
        ("approve", None, 1),
        ("approve", 1, 2),
        ("approve", 2, 3),
        ("rollback", 3, 2),
        ("rollback", 2, 1),
        ("rollback", 1, 3),
    ]
    for prev, cur in itertools.pairwise(events):  # a consistent chain
        assert cur["from_version"] == prev["to_version"]
    assert all(e["actor"] == "u-ml_lead" and e["reason"] for e in events)


def test_a_tampered_version_cannot_be_promoted_or_loaded(env, artifacts):
    s, storage = env["session"], env["storage"]
    v1 = _register(env, artifacts["weak"])
    v2 = _register(env, artifacts["strong"])
    _approve(env, v1)
    good = registry.materialize(storage=storage, row=v2, cache_root=env["cache"])
    key = f"{v2.artifact_key}/weights.pt"
    data = bytearray(storage.get(key))
    data[len(data) // 2] ^= 0xFF
    storage.put(key, bytes(data))
    with pytest.raises(ArtifactIntegrityError, match=r"weights\.pt has sha256"):
        _approve(env, v2)
    refused = _audit(s, "models.approve", "refused")
    assert refused and "sha256" in refused[-1].detail["why"]
    assert registry.get_version(session=s, ref="champion").id == v1.id
    # serving path: the cached copy is fine, but a fresh load from storage is refused
    import shutil

    shutil.rmtree(good)
    with pytest.raises(ArtifactIntegrityError):
        registry.load_version(storage=storage, row=v2, cache_root=env["cache"])
    # a tampered local cache is replaced from (intact) storage
    v1_path = registry.materialize(storage=storage, row=v1, cache_root=env["cache"])
    (v1_path / "weights.pt").write_bytes(b"evil")
    loaded = registry.load_version(storage=storage, row=v1, cache_root=env["cache"])
    assert loaded.classes == [str(d) for d in range(10)]


def test_bootstrap_makes_the_first_version_champion_through_approval(env, artifacts):
    s, storage = env["session"], env["storage"]
    version, promoted = bootstrap_champion(
        session=s, storage=storage, artifact_dir=artifacts["strong"], cache_root=env["cache"]
    )
    assert (version, promoted) == (1, True)
    (event,) = registry.history(session=s)
    assert event.actor == DEMO_LEAD and event.action == PromotionAction.APPROVE
    assert _audit(s, "models.approve", "ok")[0].actor == DEMO_LEAD
    again = bootstrap_champion(
        session=s, storage=storage, artifact_dir=artifacts["strong"], cache_root=env["cache"]
    )
    assert again == (1, False) and len(registry.history(session=s)) == 1


# --------------------------------------------------------------------------- the race


def test_two_leads_approving_at_once_leave_exactly_one_champion(fresh_db_url, artifacts, tmp_path):
    """Two ML leads, two candidates, released together by a barrier, on separate
    connections with real commits: one wins, the other is refused with Conflict."""
    migrations.upgrade(fresh_db_url)
    engine = make_engine(fresh_db_url)
    storage = LocalStorage(tmp_path / "store")
    cache = tmp_path / "cache"
    try:
        with Session(engine, expire_on_commit=False) as s:
            seed_demo(session=s, storage=storage, limit=SEED_SIZE)
            for name in ("lead-a", "lead-b"):
                create_user(session=s, username=name, role=Role.ML_LEAD)
            s.commit()
            base = registry.register_version(
                session=s, storage=storage, artifact_dir=artifacts["weak"], created_by="t"
            )
            registry.approve(
                session=s,
                storage=storage,
                version=base,
                user=_user(s, "lead-a"),
                reason="first",
                cache_root=cache,
            )
            for name in ("strong", "strong_b"):
                registry.register_version(
                    session=s, storage=storage, artifact_dir=artifacts[name], created_by="t"
                )
        barrier = threading.Barrier(2)
        outcomes: dict[str, object] = {}

        def decide(lead: str, version: int) -> None:
            with Session(engine, expire_on_commit=False) as s:
                user = _user(s, lead)
                proposal = registry.propose(
                    session=s, storage=storage, ref=version, cache_root=cache, config=LOOSE
                )
                barrier.wait(timeout=60)
                try:
                    outcomes[lead] = registry.approve(
                        session=s,
                        storage=storage,
                        version=version,
                        user=user,
                        reason="wins on hold-out",
                        cache_root=cache,
                        config=LOOSE,
                        proposal=proposal,
                    )
                except Exception as exc:  # recorded for the assertions
                    outcomes[lead] = exc

        threads = [
            threading.Thread(target=decide, args=("lead-a", 2)),
            threading.Thread(target=decide, args=("lead-b", 3)),
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        kinds = sorted(type(o).__name__ for o in outcomes.values())
        assert kinds == ["Conflict", "PromotionEvent"], outcomes
        winner = next(o for o in outcomes.values() if isinstance(o, PromotionEvent))
        loser = next(o for o in outcomes.values() if isinstance(o, Conflict))
        assert "champion changed" in loser.detail
        with Session(engine) as s:
            champ = registry.alias_of(session=s, alias="champion")
            assert champ.id == winner.to_version_id
            events = registry.history(session=s, alias="champion")
            assert [e.from_version_id for e in events] == [None, events[0].to_version_id]
            assert events[-1].to_version_id == champ.id
            assert len(_audit(s, "models.approve", "refused")) == 1
    finally:
        engine.dispose()


def _user(session, name):
    from quarkflow_core.users import get_user

    return get_user(session=session, username=name)


def test_versions_round_trip_through_each_storage_backend(db_session, storage, artifacts, tmp_path):
    """Local folder and fake-gcs-server: upload, verified download, tamper refused."""
    row = registry.register_version(
        session=db_session, storage=storage, artifact_dir=artifacts["weak"], created_by="t"
    )
    loaded = registry.load_version(storage=storage, row=row, cache_root=tmp_path / "c1")
    assert loaded.architecture == "smallcnn"
    storage.put(f"{row.artifact_key}/weights.pt", b"not the weights")
    with pytest.raises(ArtifactIntegrityError, match="will not be promoted or served"):
        registry.verify_stored(storage=storage, row=row)
    storage.delete(f"{row.artifact_key}/manifest.json")
    with pytest.raises(ArtifactIntegrityError, match="missing from storage"):
        registry.materialize(storage=storage, row=row, cache_root=tmp_path / "c2")

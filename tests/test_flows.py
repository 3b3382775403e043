"""Prefect flows under one shared prefect_test_harness: retrain (idempotent, retried, failing
cleanly), the label-count trigger, batch prediction on a 2-worker Dask cluster."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient
from helpers.data import SEED_SIZE
from helpers.serving import deploy
from sqlalchemy import func, select
from sqlalchemy.orm import Session
from typer.testing import CliRunner

from app import cli
from app.api import create_app
from quarkflow_core import registry
from quarkflow_core.config import get_settings
from quarkflow_core.demo_data import demo_pngs, seed_demo
from quarkflow_core.schema import Image, ModelVersion, Prediction, ReviewItem

pytestmark = [pytest.mark.integration, pytest.mark.slow]
QUICK = {"epochs": 2, "min_epochs": 2, "batch_size": 64, "augment": "none", "export": "onnx"}


@pytest.fixture
def loop(prefect_harness, monkeypatch, tmp_path, trained_artifacts):
    """SQLite + local storage named by QF_* (as a worker would see them), the weak model as
    champion, and the SEED_SIZE-digit seed snapshot."""
    db_url, store_url = f"sqlite:///{tmp_path}/qf.db", f"file://{tmp_path}/store"
    monkeypatch.setenv("QF_DATABASE_URL", db_url)
    monkeypatch.setenv("QF_STORAGE_URL", store_url)
    monkeypatch.setenv("QF_API_URL", "")
    get_settings.cache_clear()
    dep = deploy(db_url, store_url, tmp_path / "qf", trained_artifacts["weak"])
    engine = dep.engine()
    with Session(engine) as s:
        seed_demo(session=s, storage=dep.storage(), limit=SEED_SIZE)
        s.commit()
    yield dep, engine
    engine.dispose()


def _versions(engine) -> list[int]:
    with Session(engine) as s:
        return list(s.scalars(select(ModelVersion.version).order_by(ModelVersion.version)))


def test_retrain_registers_a_challenger_and_is_idempotent(loop):
    from flows.retrain import retrain

    _dep, engine = loop
    result = retrain(**QUICK)
    cand = result["candidate"]
    assert result["reused"] is False and cand["version"] == 2 and cand["champion"] == 1
    assert result["snapshot"]["train"] == 480 and result["snapshot"]["holdout"] == 120
    assert cand["policy"]["verdict"] in ("pass", "fail") and cand["policy"]["checks"]
    assert cand["accuracy_candidate"] > cand["accuracy_champion"]  # 480 images beat 120
    assert result["parity_max_abs_diff"] <= 1e-4
    with Session(engine) as s:
        assert registry.get_version(session=s, ref="challenger").version == 2
        row = registry.get_version(session=s, ref=2)
        assert "model.onnx" in row.manifest["files"] and row.training_run_id is not None
        assert row.manifest["training"]["config"]["min_epochs"] == 2  # the option reached fit
    again = retrain(**QUICK)
    assert again["reused"] is True and again["candidate"]["version"] == 2
    assert _versions(engine) == [1, 2]
    # `quarkflow retrain` passes the same options and prints a machine-readable result
    out = CliRunner().invoke(
        cli.app,
        [
            "retrain",
            "--epochs",
            "2",
            "--min-epochs",
            "2",
            "--batch-size",
            "64",
            "--augment",
            "none",
            "--json",
        ],
    )
    assert out.exit_code == 0, out.output
    printed = json.loads(out.stdout.strip().splitlines()[-1])
    assert printed["reused"] is True and printed["candidate"]["version"] == 2
    assert printed["spec"]["batch_size"] == 64 and printed["spec"]["min_epochs"] == 2
    bad = CliRunner().invoke(cli.app, ["retrain", "--epochs", "5", "--min-epochs", "9"])
    assert bad.exit_code != 0 and "min_epochs must be between 1 and epochs (5)" in str(
        bad.exception
    )


def test_a_failed_train_task_is_retried(loop, monkeypatch):
    import quarkflow_core.pipeline as core
    from flows.retrain import retrain

    _dep, _engine = loop
    real = core.train_step
    calls = {"n": 0}

    def flaky(**kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise ConnectionError("worker lost its connection (injected)")
        return real(**kwargs)

    monkeypatch.setattr(core, "train_step", flaky)
    result = retrain(**QUICK)
    assert calls["n"] == 2 and result["candidate"]["version"] == 2


def test_a_permanent_failure_registers_nothing(loop, monkeypatch):
    import quarkflow_core.pipeline as core
    from flows.retrain import retrain

    _dep, engine = loop

    def broken(**kwargs):
        raise RuntimeError("out of memory (injected)")

    monkeypatch.setattr(core, "train_step", broken)
    with pytest.raises(RuntimeError, match="out of memory"):
        retrain(**QUICK)
    assert _versions(engine) == [1]
    with Session(engine) as s:
        assert "challenger" not in registry.aliases(session=s)


def test_label_count_trigger_starts_the_retrain_deployment(loop, monkeypatch):
    from flows.retrain import retrain
    from flows.triggers import label_trigger
    from quarkflow_core.outbox import Record
    from quarkflow_core.predictions import FEEDBACK, PREDICTION, apply_records

    dep, engine = loop
    monkeypatch.setenv("QF_RETRAIN_MIN_NEW_LABELS", "3")
    get_settings.cache_clear()
    assert label_trigger(launch=False)["due"] is False
    # three experts' answers about three predictions arrive
    pngs, labels = demo_pngs(SEED_SIZE + 3)
    from quarkflow_core.images import probe_image

    records = []
    for i in range(SEED_SIZE, SEED_SIZE + 3):
        info = probe_image(pngs[i])
        pid = f"00000000-0000-0000-0000-00000000{i:04d}"
        records.append(
            Record(
                0,
                PREDICTION,
                pid,
                {
                    "id": pid,
                    "label": "0",
                    "confidence": 0.4,
                    "topk": [],
                    "margin": 0.1,
                    "entropy": 0.9,
                    "model_version": 1,
                    "latency_ms": 1.0,
                    "review": True,
                    "created_at": "2026-11-21T12:00:00+00:00",
                    "image": {k: getattr(info, k) for k in info.__dataclass_fields__},
                },
                pngs[i],
                0,
            )
        )
        records.append(
            Record(
                0,
                FEEDBACK,
                f"fb-{i}",
                {
                    "id": f"fb-{i}",
                    "prediction_id": pid,
                    "verdict": "wrong",
                    "true_label": labels[i],
                    "created_at": "2099-01-01T00:00:00+00:00",
                },
                None,
                0,
            )
        )
    with Session(engine) as s:
        apply_records(s, dep.storage(), records)
        s.commit()
    decision = label_trigger(launch=False)
    assert decision["due"] is True and decision["counts"]["total"] == 3
    monkeypatch.setenv("QF_RETRAIN_MIN_PER_CLASS", "2")
    get_settings.cache_clear()
    assert label_trigger(launch=False)["due"] is False  # three classes with one label each

    monkeypatch.delenv("QF_RETRAIN_MIN_PER_CLASS")
    get_settings.cache_clear()
    retrain.to_deployment(name="retrain").apply()
    launched = label_trigger(launch=True)
    assert launched["flow_run"]
    from prefect import get_client

    with get_client(sync_client=True) as client:
        run = client.read_flow_run(launched["flow_run"])
    assert run.state.is_scheduled()  # handed to the worker that serves the deployment


def test_batch_predict_on_a_two_worker_dask_cluster(loop, tmp_path):
    from flows.batch_predict import batch_predict
    from quarkflow_core.storage import LocalStorage

    dep, engine = loop
    inbox = LocalStorage(tmp_path / "inbox")
    pngs, _labels = demo_pngs(1000)
    for i in range(700, 712):  # digits that are not in the seed set
        inbox.put(f"incoming/{i}.png", pngs[i])
    inbox.put("incoming/notes.png", b"this is not an image")
    with Session(engine) as s:
        before = s.scalar(select(func.count()).select_from(Prediction))
    result = batch_predict(prefix="incoming/", source_url=f"file://{tmp_path}/inbox", chunk_size=4)
    assert result["images"] == 13 and result["chunks"] == 4 and result["predicted"] == 12
    assert [e["key"] for e in result["errors"]] == ["incoming/notes.png"]
    with Session(engine) as s:
        assert s.scalar(select(func.count()).select_from(Prediction)) == before + 12
        batch_images = s.scalars(select(Image).where(Image.source == "batch")).all()
    assert len(batch_images) == 12
    assert all(dep.storage().exists(im.storage_key) for im in batch_images)
    # every image's prediction id and review item, to act on
    by_key = {p["key"]: p for p in result["predictions"]}
    assert set(by_key) == {f"incoming/{i}.png" for i in range(700, 712)}
    with Session(engine) as s:
        for p in by_key.values():
            row = s.get(Prediction, p["prediction_id"])
            assert row is not None and row.label == p["label"]
            item = s.scalar(select(ReviewItem).where(ReviewItem.image_id == row.image_id))
            assert (item.id if item else None) == p["review_item_id"] or not p["review"]
            assert bool(p["review_item_id"]) == p["review"]
    assert result["review_items"] == sorted(
        p["review_item_id"] for p in by_key.values() if p["review"]
    )
    # the same from the command line, then the image's latest prediction through the API
    out = CliRunner().invoke(
        cli.app,
        ["batch-predict", "incoming/", "--source", f"file://{tmp_path}/inbox", "--json"],
    )
    assert out.exit_code == 0, out.output
    again = {p["key"]: p for p in json.loads(out.stdout.strip().splitlines()[-1])["predictions"]}
    assert set(again) == set(by_key)
    first = again["incoming/700.png"]
    assert first["prediction_id"] != by_key["incoming/700.png"]["prediction_id"]
    app = create_app(dep.settings(), with_demo=False, watch=False)
    with TestClient(app) as client:
        r = client.get(
            f"/api/v1/images/{first['image_sha256']}/prediction", headers=dep.auth("expert")
        )
        assert r.status_code == 200 and r.json()["id"] == first["prediction_id"]
        unknown = client.get(f"/api/v1/images/{'0' * 64}/prediction", headers=dep.auth("expert"))
        assert unknown.status_code == 404 and "no logged prediction" in unknown.json()["detail"]
        bad = client.get("/api/v1/images/not-a-hash/prediction", headers=dep.auth("expert"))
        assert bad.status_code == 422

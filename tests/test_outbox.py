"""The outbox's fault handling: an outage (a missing bucket included) keeps every record; a
record the database refuses is retried on its own, then becomes a dead letter that /metrics,
/readyz and `quarkflow outbox list` report, and that an ml_lead replays or discards (audited).
Real API (in-process), real SQLite / Postgres, real fake-gcs-server."""

from __future__ import annotations

import json
import uuid
from contextlib import contextmanager
from datetime import UTC, datetime

import pytest
from fastapi.testclient import TestClient
from helpers.serving import deploy, local_deploy, run_cli, wait_until
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.api import create_app
from quarkflow_core.demo_data import demo_pngs
from quarkflow_core.errors import ObjectNotFound, StorageError
from quarkflow_core.outbox import Flusher, Outbox
from quarkflow_core.predictions import FEEDBACK
from quarkflow_core.schema import AuditLog, Feedback, Prediction
from quarkflow_core.service import is_transient

pytestmark = pytest.mark.integration


def test_a_missing_bucket_is_an_outage_and_a_missing_object_is_not(gcs_host):
    from helpers.storage import make_gcs

    store = make_gcs(gcs_host)
    store.put("a/b.txt", b"x")
    with pytest.raises(ObjectNotFound):
        store.get("a/missing.txt")
    for blob in store.client.list_blobs(store.bucket_name):
        blob.delete()
    store.bucket.delete()
    with pytest.raises(StorageError) as err:
        store.put("a/c.txt", b"y", overwrite=False)
    assert not isinstance(err.value, ObjectNotFound)
    assert "not found while writing" in str(err.value) and "quarkflow init" in str(err.value)
    assert is_transient(err.value)  # the flusher keeps the record and retries
    store.prepare()  # what `quarkflow init` does
    assert store.put("a/c.txt", b"y", overwrite=False).created


def test_an_outage_keeps_every_record_for_as_long_as_it_takes(tmp_path):
    """A batch that fails with an outage is retried with backoff, never counted against a
    record; the records flush once the dependency is back."""
    box = Outbox(tmp_path / "outbox.db")
    down = {"tries": 0}

    def apply(records):
        if down["tries"] < 6:
            down["tries"] += 1
            raise StorageError("QF_STORAGE_URL: bucket 'x' not found while writing")

    flusher = Flusher(box, apply, is_transient=is_transient, max_backoff_s=0.05)
    for i in range(5):
        box.append(FEEDBACK, f"k{i}", {"i": i})
    flusher.start()
    try:
        wait_until(lambda: box.depth() == 0, timeout=20, what="the outbox to drain")
    finally:
        flusher.stop()
    assert down["tries"] == 6 and box.dead_letters() == 0 and flusher.flushed == 5
    assert flusher.last_error is None and flusher.failing_since is None


def _cli(dep, monkeypatch, *args: str):
    return run_cli(dep, monkeypatch, *args)


def _audit(dep, action: str) -> list[AuditLog]:
    engine = dep.engine()
    try:
        with Session(engine) as s:
            return list(s.scalars(select(AuditLog).where(AuditLog.action == action)))
    finally:
        engine.dispose()


def test_dead_letters_are_counted_listed_replayed_and_discarded(
    db_backend, fresh_db_url, tmp_path, trained_artifacts, monkeypatch
):
    dep = (
        local_deploy(tmp_path, trained_artifacts["strong"])
        if db_backend == "sqlite"
        else deploy(
            fresh_db_url, f"file://{tmp_path}/store", tmp_path / "qf", trained_artifacts["strong"]
        )
    )
    app = create_app(dep.settings(), with_demo=False)
    pngs, _ = demo_pngs(3)
    with TestClient(app) as client:
        service = app.state.service
        service.flusher.max_attempts, service.flusher.max_record_pause_s = 3, 0.05
        # Two records the database must refuse: feedback on predictions that do not exist (an
        # id this test makes up, so the records can be fixed or given up on below).
        ghosts = [str(uuid.uuid4()), str(uuid.uuid4())]
        for ghost in ghosts:
            service.outbox.append(
                FEEDBACK,
                f"fb-{ghost}",
                {
                    "id": str(uuid.uuid4()),
                    "prediction_id": ghost,
                    "verdict": "correct",
                    "true_label": "3",
                    "comment": None,
                    "user_id": None,
                    "created_at": datetime.now(UTC).isoformat(),
                },
            )
        # good records keep flowing meanwhile
        good = client.post(
            "/api/v1/predictions",
            files={"file": ("d.png", pngs[0], "image/png")},
            headers=dep.auth("expert"),
        )
        assert good.status_code == 200, good.text
        wait_until(  # the good record may be flushed in the same batch as their last try
            lambda: service.outbox.dead_letters() == 2 and service.outbox.depth() == 0,
            timeout=30,
            what="dead letters, the good record flushed",
        )
        assert client.get(
            f"/api/v1/predictions/{good.json()['id']}", headers=dep.auth("expert")
        ).json()["logged"]
        metrics = client.get("/metrics").text
        assert "qf_outbox_dead_letters 2.0" in metrics
        outbox = client.get("/readyz").json()["checks"]["outbox"]
        assert outbox["dead_letters"] == 2 and outbox["depth"] == 0 and not outbox["outage"]

        listed = _cli(dep, monkeypatch, "outbox", "list", "--json")
        assert listed.exit_code == 0, listed.output
        letters = json.loads(listed.output)["dead_letters"]
        assert [d["payload"]["prediction_id"] for d in letters] == ghosts
        assert all("unknown prediction" in d["error"] and d["attempts"] == 3 for d in letters)
        human = _cli(dep, monkeypatch, "outbox", "list")
        assert "dead letters: 2" in human.output and "quarkflow outbox replay" in human.output

        # an analyst may not replay: refused and audited; nothing moves
        refused = _cli(dep, monkeypatch, "outbox", "replay", "--user", "analyst")
        assert refused.exit_code != 0 and "ml_lead" in str(refused.exception or refused.output)
        assert [a.outcome for a in _audit(dep, "outbox.replay")] == ["denied"]
        assert service.outbox.dead_letters() == 2

        # the cause of the first is fixed (its prediction now exists), then an ml_lead replays it
        engine = dep.engine()
        with Session(engine) as s:
            real = s.get(Prediction, good.json()["id"])
            s.add(
                Prediction(
                    id=ghosts[0],
                    image_id=real.image_id,
                    model_version_id=real.model_version_id,
                    label="3",
                    confidence=0.5,
                    topk=real.topk,
                    latency_ms=1.0,
                )
            )
            s.commit()
        first, second = (d["id"] for d in letters)
        replayed = _cli(dep, monkeypatch, "outbox", "replay", str(first), "--user", "lead")
        assert replayed.exit_code == 0, replayed.output
        assert "1 dead letter(s) back in the outbox" in replayed.output

        def landed() -> bool:
            with Session(engine) as s:
                return s.scalar(select(Feedback).where(Feedback.prediction_id == ghosts[0]))

        wait_until(landed, timeout=20, what="the replayed feedback to land")
        ok = [a for a in _audit(dep, "outbox.replay") if a.outcome == "ok"]
        assert [(a.actor, a.target_id) for a in ok] == [("lead", f"fb-{ghosts[0]}")]

        # the other is given up on, with a reason that is kept
        short = _cli(dep, monkeypatch, "outbox", "discard", str(second), "--reason", "no")
        assert short.exit_code != 0 and service.outbox.dead_letters() == 1
        reason = "test record naming a prediction that never existed"
        gone = _cli(
            dep, monkeypatch, "outbox", "discard", str(second), "--reason", reason, "--user", "lead"
        )
        assert gone.exit_code == 0, gone.output
        assert service.outbox.dead_letters() == 0
        (audit,) = _audit(dep, "outbox.discard")
        assert audit.actor == "lead" and audit.detail["reason"] == reason
        assert "unknown prediction" in audit.detail["error"]
        kept = service.outbox._conn.execute("SELECT key, reason, actor FROM discarded").fetchall()
        assert kept == [(f"fb-{ghosts[1]}", reason, "lead")]
        assert "qf_outbox_dead_letters 0.0" in client.get("/metrics").text
        engine.dispose()


@pytest.mark.slow
def test_sqlite_review_decisions_never_find_the_database_locked(tmp_path, trained_artifacts):
    """Analysts resolve and dismiss review items through a real server on SQLite while three
    clients keep predicting (the flusher writing all the while): every call succeeds, none
    answers 'database is locked', and every prediction acknowledged is logged."""
    import threading

    import httpx
    from helpers.serving import ServerProcess, free_port

    dep = local_deploy(tmp_path, trained_artifacts["strong"])
    server = ServerProcess(
        dep.env(QF_REVIEW_THRESHOLD="0.9999"), free_port(), tmp_path / "server.log"
    )
    pngs, _ = demo_pngs(60)
    stop, acked, failed = threading.Event(), [], []

    def predict(offset: int) -> None:
        with httpx.Client(base_url=server.url, headers=dep.auth("expert"), timeout=60) as c:
            i = offset
            while not stop.is_set():
                r = c.post(
                    "/api/v1/predictions",
                    files={"file": ("d.png", pngs[i % len(pngs)], "image/png")},
                )
                (acked if r.status_code == 200 else failed).append(r)
                i += 3

    threads = [threading.Thread(target=predict, args=(k,)) for k in range(3)]
    decisions = []
    try:
        server.wait_live()
        for t in threads:
            t.start()
        with httpx.Client(base_url=server.url, headers=dep.auth("analyst"), timeout=60) as c:
            wait_until(
                lambda: c.get("/api/v1/review-queue?limit=1").json()["total"] >= 40,
                timeout=90,
                what="40 items in the review queue",
            )
            items = c.get("/api/v1/review-queue?limit=40&strategy=uncertainty").json()["items"]
            for n, item in enumerate(items):
                if n % 2:
                    r = c.post(f"/api/v1/review-queue/{item['id']}/dismiss")
                else:
                    r = c.post(
                        f"/api/v1/review-queue/{item['id']}/resolve",
                        json={"label": item["predicted_label"]},
                    )
                decisions.append(r)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=90)
    try:
        assert [r.status_code for r in decisions] == [200] * 40, [
            r.text for r in decisions if r.status_code != 200
        ]
        assert not failed, [f"{r.status_code} {r.text}" for r in failed[:3]]
        ids = {r.json()["id"] for r in acked}
        engine = dep.engine()

        def all_logged() -> bool:
            with Session(engine) as s:
                return ids <= set(s.scalars(select(Prediction.id)))

        wait_until(all_logged, timeout=60, what=f"all {len(ids)} acknowledged predictions")
        engine.dispose()
        assert "database is locked" not in (tmp_path / "server.log").read_text()
    finally:
        server.stop()


# --------------------------------------------------------------------------- batched flushing


def _records(pngs: list[bytes], *, unsure_every: int = 2) -> list[tuple[str, dict, bytes]]:
    """(id, payload, image) of prediction records as the service writes them."""
    from quarkflow_core.images import probe_image
    from quarkflow_core.predictions import prediction_record

    out = []
    for i, data in enumerate(pngs):
        conf = 0.3 if i % unsure_every == 0 else 0.95
        summary = {
            "label": "3",
            "confidence": conf,
            "topk": [{"label": "3", "confidence": conf}],
            "margin": conf,
            "entropy": 0.2,
        }
        payload = prediction_record(
            summary=summary,
            info=probe_image(data),
            model_version=None,
            latency_ms=1.0,
            review_threshold=0.8,
        )
        out.append((payload["id"], payload, data))
    return out


@contextmanager
def _counting(engine):
    """Count the statements and commits ``engine`` runs inside the block."""
    from sqlalchemy import event

    counts = {"statements": 0, "commits": 0}

    def statement(*args, **_kwargs):
        counts["statements"] += 1

    def commit(*_args):
        counts["commits"] += 1

    event.listen(engine, "before_cursor_execute", statement)
    event.listen(engine, "commit", commit)
    try:
        yield counts
    finally:
        event.remove(engine, "before_cursor_execute", statement)
        event.remove(engine, "commit", commit)


def test_a_flushed_batch_is_one_transaction_of_a_few_statements(fresh_db_url, tmp_path):
    """Predictions flush in one database transaction whose statement count does not grow with
    the batch (36 records, some of the same image, half unsure, cost what 4 do), and leave the
    outbox in one outbox transaction; feedback on a prediction of the same batch is applied
    after it. The rows are what writing one by one gave."""
    from quarkflow_core.predictions import PREDICTION
    from quarkflow_core.schema import Image, ReviewItem
    from quarkflow_core.service import PredictionService

    dep = deploy(fresh_db_url, f"file://{tmp_path}/store", tmp_path / "qf", None)
    service = PredictionService(dep.settings())
    try:
        pngs, _ = demo_pngs(31)
        records = _records(pngs[:30] + pngs[:10])  # 30 images, 10 of them predicted twice
        mixed = _records(pngs[30:])  # and one more, with feedback in its batch
        feedback = {
            "id": str(uuid.uuid4()),
            "prediction_id": mixed[0][0],
            "verdict": "correct",
            "true_label": "3",
            "comment": None,
            "user_id": None,
            "created_at": datetime.now(UTC).isoformat(),
        }
        counts = {}
        for size, batch in (("small", records[:4]), ("large", records[4:]), ("mixed", mixed)):
            for key, payload, data in batch:
                service.outbox.append(PREDICTION, key, payload, data)
            if size == "mixed":
                service.outbox.append(FEEDBACK, "fb", feedback)
            removes = []
            real_remove = service.outbox.remove
            service.outbox.remove = lambda ids, real=real_remove: (removes.append(ids), real(ids))
            flusher = Flusher(service.outbox, service._apply, is_transient=is_transient)
            with _counting(service.engine) as counts[size]:
                assert flusher.flush_once() == len(batch) + (size == "mixed")
            service.outbox.remove = real_remove
            assert len(removes) == 1 and service.outbox.depth() == 0  # one outbox delete
            assert counts[size]["commits"] == 1, counts  # one database transaction
        assert counts["large"]["statements"] <= counts["small"]["statements"] + 1, counts
        with Session(service.engine) as s:
            assert s.query(Prediction).count() == 41
            assert s.query(Image).count() == 31
            unsure_images = {
                s.get(Prediction, key).image_id for key, p, _ in records + mixed if p["review"]
            }
            items = s.scalars(select(ReviewItem)).all()
            assert {i.image_id for i in items} == unsure_images
            assert len(items) == len(unsure_images)
            assert [f.prediction_id for f in s.scalars(select(Feedback))] == [mixed[0][0]]
    finally:
        service.outbox.close()
        service.engine.dispose()


def test_records_survive_a_crash_between_the_commit_and_the_outbox_delete(fresh_db_url, tmp_path):
    """The database commits, then the process dies before the outbox forgets the records:
    they stay in the outbox, and the restarted flusher writes nothing twice."""
    from quarkflow_core.predictions import PREDICTION
    from quarkflow_core.schema import Image, ReviewItem
    from quarkflow_core.service import PredictionService

    dep = deploy(fresh_db_url, f"file://{tmp_path}/store", tmp_path / "qf", None)
    service = PredictionService(dep.settings())
    try:
        pngs, _ = demo_pngs(12)
        records = _records(pngs)
        for key, payload, data in records:
            service.outbox.append(PREDICTION, key, payload, data)

        def crash(ids):
            raise SystemExit("killed between the commit and the delete")

        real_remove = service.outbox.remove
        service.outbox.remove = crash
        with pytest.raises(SystemExit):
            Flusher(service.outbox, service._apply, is_transient=is_transient).flush_once()
        service.outbox.remove = real_remove
        assert service.outbox.depth() == 12  # still there: acknowledged records are kept

        def rows(s):
            return (
                s.query(Prediction).count(),
                s.query(Image).count(),
                s.query(ReviewItem).count(),
            )

        with Session(service.engine) as s:
            before = rows(s)
        assert before[:2] == (12, 12)
        restarted = Flusher(service.outbox, service._apply, is_transient=is_transient)
        assert restarted.flush_once() == 12 and service.outbox.depth() == 0
        with Session(service.engine) as s:
            assert rows(s) == before
    finally:
        service.outbox.close()
        service.engine.dispose()

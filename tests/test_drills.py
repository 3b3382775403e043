"""Fault drills (issue 16): real faults while predictions and feedback flow through a real
`quarkflow serve` process. Each drill ends with every acknowledged record counted in the
database (and every image written after the fault in storage), nothing in ``dead_letter``
and an empty outbox.

1. the GCS bucket is deleted for real and recreated by `quarkflow init`;
2. a private Postgres cluster is stopped (`pg_ctl stop -m fast`) and started again;
3. the API is killed with SIGKILL mid-burst and restarted on the same data dir.

An acknowledged record is one that got a 2xx answer; a request that got no answer (the
process was killed) or an error status is not acknowledged and is only counted."""

from __future__ import annotations

import contextlib
import io
import random
import re
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import pytest
from helpers.pg_cluster import private_cluster
from helpers.serving import ServerProcess, deploy, free_port, local_deploy, wait_until
from PIL import Image as PILImage
from sqlalchemy import select
from sqlalchemy.orm import Session

from quarkflow_core.demo_data import demo_pngs
from quarkflow_core.schema import Feedback, Image, Prediction

pytestmark = [pytest.mark.integration, pytest.mark.slow]


# --------------------------------------------------------------------------- traffic


class UniqueDigits:
    """Real demo digits, each call a different PNG (a counter in three corner pixels, which
    are black in MNIST), so every prediction has a new image that must be written."""

    def __init__(self, n_base: int = 40) -> None:
        pngs, _ = demo_pngs(n_base)
        self.base = [np.array(PILImage.open(io.BytesIO(p)).convert("L")) for p in pngs]
        self._n = 0
        self._lock = threading.Lock()

    def next(self) -> bytes:
        with self._lock:
            n = self._n
            self._n += 1
        pixels = self.base[n % len(self.base)].copy()
        pixels[0, 0:3] = [n & 0xFF, (n >> 8) & 0xFF, (n >> 16) & 0xFF]
        buf = io.BytesIO()
        PILImage.fromarray(pixels, mode="L").save(buf, format="PNG")
        return buf.getvalue()


@dataclass
class Traffic:
    """Background clients posting predictions and feedback; records what was acknowledged.

    Each client posts a prediction (a new image), then feedback on it every
    ``feedback_every``-th time and, when ``old`` is given, feedback on one of those
    (older, already logged) predictions every ``old_every``-th time."""

    url: str
    headers: dict[str, str]
    digits: UniqueDigits
    clients: int = 2
    feedback_every: int = 3
    old: list[str] = field(default_factory=list)
    old_every: int = 4
    pause_s: float = 0.0
    # prediction id -> monotonic time the request was sent
    predictions: dict[str, float] = field(default_factory=dict)
    # feedback id -> (time sent, prediction id, "new" | "old")
    feedback: dict[str, tuple[float, str, str]] = field(default_factory=dict)
    # (time sent, what, status, body)
    refused: list[tuple[float, str, int, str]] = field(default_factory=list)
    # (time sent, what, error): no answer at all
    no_answer: list[tuple[float, str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._client, args=(n,), daemon=True, name=f"traffic-{n}")
            for n in range(self.clients)
        ]

    def start(self) -> Traffic:
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=60)

    def run_for(self, seconds: float) -> None:
        self._stop.wait(seconds)

    def _post(self, c: httpx.Client, what: str, **kwargs) -> tuple[float, httpx.Response | None]:
        path = kwargs.pop("path")
        sent = time.monotonic()
        try:
            r = c.post(path, **kwargs)
        except httpx.HTTPError as exc:
            with self._lock:
                self.no_answer.append((sent, what, f"{type(exc).__name__}: {exc}"))
            return sent, None
        if not 200 <= r.status_code < 300:
            with self._lock:
                self.refused.append((sent, what, r.status_code, r.text[:300]))
            return sent, None
        return sent, r

    def _client(self, n: int) -> None:
        rng = random.Random(n)
        i = 0
        with httpx.Client(base_url=self.url, headers=self.headers, timeout=30) as c:
            while not self._stop.is_set():
                i += 1
                files = {"file": ("d.png", self.digits.next(), "image/png")}
                sent, r = self._post(c, "prediction", path="/api/v1/predictions", files=files)
                if r is None:
                    self._stop.wait(0.05)
                    continue
                pred = r.json()
                with self._lock:
                    self.predictions[pred["id"]] = sent
                if i % self.feedback_every == 0:
                    self._feedback(c, pred["id"], pred["label"], "new", wrong=i % 2 == 0)
                if self.old and i % self.old_every == 0:
                    self._feedback(c, rng.choice(self.old), None, "old", wrong=False)
                if self.pause_s:
                    self._stop.wait(self.pause_s)

    def _feedback(self, c, prediction_id: str, label: str | None, kind: str, *, wrong: bool):
        body = {"verdict": "correct"}
        if wrong and label is not None and label.isdigit():
            body = {"verdict": "wrong", "true_label": str((int(label) + 1) % 10)}
        sent, r = self._post(
            c,
            f"feedback ({kind} prediction)",
            path=f"/api/v1/predictions/{prediction_id}/feedback",
            json=body,
        )
        if r is not None:
            with self._lock:
                self.feedback[r.json()["id"]] = (sent, prediction_id, kind)

    # ------------------------------------------------------------------ reading the record

    def predictions_between(self, start: float, end: float = float("inf")) -> list[str]:
        with self._lock:
            return [p for p, t in self.predictions.items() if start <= t < end]

    def feedback_between(self, start: float, end: float = float("inf"), kind=None) -> list[str]:
        with self._lock:
            return [
                f
                for f, (t, _, k) in self.feedback.items()
                if start <= t < end and (kind is None or k == kind)
            ]

    def refused_between(self, start: float, end: float = float("inf"), what=None) -> list:
        with self._lock:
            return [
                r for r in self.refused if start <= r[0] < end and (what is None or r[1] == what)
            ]

    def summary(self) -> str:
        with self._lock:
            refused = Counter((what, status) for _, what, status, _ in self.refused)
            no_answer = Counter(what for _, what, _ in self.no_answer)
            return (
                f"acknowledged {len(self.predictions)} predictions and {len(self.feedback)} "
                f"feedback; refused {dict(refused) or 0}; no answer {dict(no_answer) or 0}"
            )


# --------------------------------------------------------------------------- checks


def outbox_file(data_dir: Path) -> Path:
    return Path(data_dir) / "serving" / "outbox.db"


def read_outbox(data_dir: Path) -> dict:
    """Depth and dead letters straight from the outbox file, opened read-only."""
    path = outbox_file(data_dir)
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    try:
        depth = conn.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]
        dead = conn.execute("SELECT kind, key, error FROM dead_letter ORDER BY id").fetchall()
        errors = conn.execute(
            "SELECT last_error FROM outbox WHERE last_error IS NOT NULL LIMIT 1"
        ).fetchone()
    finally:
        conn.close()
    return {"depth": depth, "dead": dead, "last_error": errors[0] if errors else None}


def missing_rows(engine, predictions, feedback) -> tuple[list[str], list[str]]:
    with Session(engine) as s:
        have_p = set(s.scalars(select(Prediction.id)))
        have_f = set(s.scalars(select(Feedback.id)))
    return sorted(set(predictions) - have_p), sorted(set(feedback) - have_f)


def image_keys(engine, predictions) -> dict[str, str]:
    """prediction id -> storage key of its image (only for logged predictions)."""
    wanted = set(predictions)
    with Session(engine) as s:
        rows = s.execute(
            select(Prediction.id, Image.storage_key).join(Image, Image.id == Prediction.image_id)
        ).all()
    return {pid: key for pid, key in rows if pid in wanted}


def wait_for_flush(engine, data_dir: Path, *traffics: Traffic, timeout: float = 150.0) -> float:
    """Poll until every acknowledged record is in the database and the outbox is empty, or a
    record reaches the dead letters (nothing will bring it back), or ``timeout``. Returns the
    seconds waited; the caller asserts on what it finds."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        try:
            state = read_outbox(data_dir)
            if state["dead"]:
                break
            predictions = [p for t in traffics for p in list(t.predictions)]
            feedback = [f for t in traffics for f in list(t.feedback)]
            missing_p, missing_f = missing_rows(engine, predictions, feedback)
            if not missing_p and not missing_f and state["depth"] == 0:
                break
        except Exception:  # the database may still be coming back
            pass
        time.sleep(0.5)
    return time.monotonic() - started


_IDS = re.compile(r"([0-9a-f]{2}/)?[0-9a-f]{8,}(-[0-9a-f]{4,})*")


def describe_dead(dead: list[tuple[str, str, str]]) -> str:
    kinds = Counter(kind for kind, _, _ in dead)
    # the same error for every record, but for the key or id it names
    errors = Counter(_IDS.sub("<id>", error or "")[:200] for *_, error in dead)
    return f"{len(dead)} records in dead_letter {dict(kinds)}; errors: {errors.most_common(3)}"


def assert_nothing_lost(
    engine, dep, traffic: Traffic, *, server_url: str | None, image_owners=None
) -> None:
    """Every acknowledged prediction and feedback row present (counted), every image of
    ``image_owners`` (default: every acknowledged prediction) present in storage, no dead
    letters (readyz and the outbox file), the outbox empty."""
    state = read_outbox(dep.data_dir)
    problems = []
    if state["dead"]:
        problems.append(describe_dead(state["dead"]))
    missing_p, missing_f = missing_rows(engine, traffic.predictions, traffic.feedback)
    if missing_p:
        problems.append(
            f"missing {len(missing_p)} of {len(traffic.predictions)} acknowledged predictions: "
            f"{missing_p[:5]}"
        )
    if missing_f:
        problems.append(
            f"missing {len(missing_f)} of {len(traffic.feedback)} acknowledged feedback: "
            f"{missing_f[:5]}"
        )
    if state["depth"]:
        problems.append(
            f"{state['depth']} records still in the outbox (last error: {state['last_error']})"
        )
    owners = list(traffic.predictions if image_owners is None else image_owners)
    keys = image_keys(engine, owners)
    storage = dep.storage()
    no_object = [pid for pid in owners if pid in keys and not storage.exists(keys[pid])]
    if no_object:
        problems.append(
            f"{len(no_object)} of {len(owners)} acknowledged predictions have no image object "
            f"in {storage.url}: {[keys[p] for p in no_object[:3]]}"
        )
    if server_url is not None:
        ready = httpx.get(server_url + "/readyz", timeout=30).json()
        outbox = ready["checks"]["outbox"]
        if outbox["dead_letters"] != 0 or outbox["depth"] != 0:
            problems.append(f"/readyz reports the outbox as {outbox}")
    assert not problems, "; ".join(problems) + f" ({traffic.summary()})"


def readyz(url: str) -> dict:
    return httpx.get(url + "/readyz", timeout=30).json()


def start_server(env: dict[str, str], port: int, log: Path) -> ServerProcess:
    server = ServerProcess(env, port, log)
    server.wait_live()
    wait_until(
        lambda: httpx.get(server.url + "/readyz", timeout=30).status_code == 200,
        timeout=60,
        what="/readyz",
    )
    return server


@pytest.fixture(scope="module")
def digits() -> UniqueDigits:
    return UniqueDigits()


@pytest.fixture(scope="module")
def pg_cluster():
    """A private Postgres cluster the drills may stop and start."""
    with private_cluster() as cluster:
        yield cluster


# --------------------------------------------------------------------------- drill 1

# How long the bucket stays missing (plus the time `quarkflow init` takes): long enough for
# many flush attempts against it (the flusher of issue 16's report moved a record to
# dead_letter after 5 quick tries, within seconds) and for the outage backoff to grow.
BUCKET_MISSING_S = 15


def delete_bucket(dep) -> tuple[int, float]:
    """Delete every object, then the bucket itself, the way an operator would; repeat while the
    flusher writes new objects in between (the bucket is not empty) and until the bucket stays
    gone: fake-gcs-server re-creates a bucket when an upload that had already found it
    completes after the deletion (real GCS refuses it). Returns how many objects were deleted
    and when the bucket was confirmed gone (monotonic)."""
    from google.api_core import exceptions as gexc

    store = dep.storage()
    client, name = store.client, store.bucket_name
    deleted = 0
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for blob in list(client.list_blobs(name)):
            with contextlib.suppress(gexc.NotFound):
                blob.delete()
                deleted += 1
        try:
            client.bucket(name).delete()
        except gexc.NotFound:
            pass
        except (gexc.Conflict, gexc.PreconditionFailed):  # not empty: written meanwhile
            continue
        gone_at = time.monotonic()
        time.sleep(1.0)  # any upload in flight at the deletion has finished by now
        if not client.bucket(name).exists():
            return deleted, gone_at
    raise AssertionError(f"could not delete bucket {name!r} within 60 s")


def test_drill_storage_bucket_deleted_and_recreated(
    pg_factory, gcs_host, tmp_path, trained_artifacts, digits
):
    """The bucket is deleted for real while predictions flow; they are still acknowledged
    (the outbox holds them); `quarkflow init` recreates it; everything acknowledged arrives.

    Objects written before the deletion are gone with the bucket (the operator deleted them);
    the images of every prediction *sent after the bucket was gone* must be in the new one."""
    from helpers.storage import make_gcs

    bucket = make_gcs(gcs_host).bucket_name
    dep = deploy(
        pg_factory.create(),
        f"gs://{bucket}/qf",
        tmp_path / "qf",
        trained_artifacts["strong"],
        emulator_host=gcs_host,
    )
    engine = dep.engine()
    server = traffic = None
    try:
        server = start_server(dep.env(), free_port(), tmp_path / "server.log")
        # paced: the outbox grows steadily rather than by thousands of records
        traffic = Traffic(server.url, dep.auth("expert"), digits, pause_s=0.1).start()
        traffic.run_for(3)
        deleted, t_gone = delete_bucket(dep)
        storage_seen_down = False
        while time.monotonic() < t_gone + BUCKET_MISSING_S:  # predictions keep flowing
            storage_seen_down |= readyz(server.url)["checks"]["storage"]["ok"] is False
            time.sleep(0.5)
        assert not dep.storage().bucket.exists(), "the bucket came back before `quarkflow init`"
        init = subprocess.run(  # the operator recreates it
            [sys.executable, "-m", "app.cli", "init"],
            env=dep.env(),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert init.returncode == 0, init.stdout[-2000:] + init.stderr[-2000:]
        t_recreated = time.monotonic()
        assert dep.storage().bucket.exists()
        traffic.run_for(3)
        traffic.stop()

        drain_s = wait_for_flush(engine, dep.data_dir, traffic)
        during = traffic.predictions_between(t_gone, t_recreated)
        print(
            f"\n[drill storage] {traffic.summary()}; {deleted} objects deleted with the bucket; "
            f"{len(during)} predictions acknowledged during the {t_recreated - t_gone:.1f}s "
            f"without a bucket; waited {drain_s:.1f}s for the flush after traffic stopped"
        )
        assert len(during) > 0, "no prediction was acknowledged while the bucket was missing"
        assert_nothing_lost(
            engine,
            dep,
            traffic,
            server_url=server.url,
            image_owners=traffic.predictions_between(t_gone),
        )
        assert not traffic.refused and not traffic.no_answer, (
            f"{len(traffic.refused)} refused, {len(traffic.no_answer)} unanswered: "
            f"{(traffic.refused + traffic.no_answer)[:3]}"
        )
        assert storage_seen_down, "/readyz never reported the missing bucket"
        assert readyz(server.url)["ready"] is True
    finally:
        if traffic is not None:
            traffic.stop()
        if server is not None:
            server.stop()
        engine.dispose()


# --------------------------------------------------------------------------- drill 2


def test_drill_postgres_stopped_and_started(pg_cluster, tmp_path, trained_artifacts, digits):
    """A private Postgres cluster is stopped (fast shutdown) mid-traffic and started again:
    predictions and feedback (on new predictions and on ones logged before the outage) are
    acknowledged durably throughout, /readyz reports the outage, everything arrives."""
    dep = deploy(
        pg_cluster.create_database("qf_drill"),
        f"file://{tmp_path}/store",
        tmp_path / "qf",
        trained_artifacts["strong"],
    )
    engine = dep.engine()
    headers = dep.auth("expert")
    server = traffic = None
    try:
        server = start_server(dep.env(), free_port(), tmp_path / "server.log")
        old = []
        for _ in range(8):  # logged before the outage: feedback on them must work during it
            r = httpx.post(
                server.url + "/api/v1/predictions",
                files={"file": ("d.png", digits.next(), "image/png")},
                headers=headers,
                timeout=30,
            )
            assert r.status_code == 200, r.text
            old.append(r.json()["id"])
        wait_until(
            lambda: not missing_rows(engine, old, [])[0], timeout=60, what="the first predictions"
        )
        traffic = Traffic(server.url, headers, digits, old=old, pause_s=0.05).start()
        traffic.run_for(3)
        t_stopping = time.monotonic()
        pg_cluster.stop("fast")
        t_down = time.monotonic()
        db_seen_down = False
        while time.monotonic() < t_down + 8:  # traffic keeps flowing without the database
            db_seen_down |= readyz(server.url)["checks"]["database"]["ok"] is False
            time.sleep(0.5)
        t_starting = time.monotonic()
        pg_cluster.start()
        traffic.run_for(3)
        traffic.stop()

        drain_s = wait_for_flush(engine, dep.data_dir, traffic)
        ready_again = wait_until(
            lambda: readyz(server.url)["checks"]["database"]["ok"] is True,
            timeout=60,
            what="/readyz to report the database back",
        )
        preds_down = traffic.predictions_between(t_stopping, t_starting)
        new_fb_down = traffic.feedback_between(t_stopping, t_starting, kind="new")
        old_fb_down = traffic.feedback_between(t_stopping, t_starting, kind="old")
        refused_down = traffic.refused_between(t_stopping, t_starting)
        print(
            f"\n[drill postgres] {traffic.summary()}; during the {t_starting - t_down:.1f}s "
            f"outage: {len(preds_down)} predictions, {len(new_fb_down)} feedback on new and "
            f"{len(old_fb_down)} on older predictions acknowledged, {len(refused_down)} "
            f"refused; waited {drain_s:.1f}s for the flush after traffic stopped"
        )
        assert db_seen_down, "/readyz never reported the database as down during the outage"
        assert ready_again
        assert len(preds_down) > 0, "no prediction was acknowledged while Postgres was down"
        assert_nothing_lost(engine, dep, traffic, server_url=server.url)
        refused = Counter((what, status) for _, what, status, _ in traffic.refused)
        assert not traffic.refused and not traffic.no_answer, (
            f"refused: {dict(refused)} ({len(refused_down)} of them during the outage), "
            f"unanswered: {len(traffic.no_answer)}; first: "
            f"{(traffic.refused + traffic.no_answer)[:2]}"
        )
    finally:
        if traffic is not None:
            traffic.stop()
        if server is not None:
            server.stop()
        engine.dispose()
        if not pg_cluster.running():  # for any later user of the module's cluster
            with contextlib.suppress(Exception):
                pg_cluster.start()


# --------------------------------------------------------------------------- drill 3


def test_drill_kill9_mid_burst(tmp_path, trained_artifacts, digits):
    """SIGKILL while requests are in flight, restart on the same data dir: every acknowledged
    prediction and feedback arrives (with its image file), nothing in dead_letter.

    So that the kill surely finds acknowledged records not yet written, a long write elsewhere
    holds SQLite's write lock for the end of the burst (the flusher cannot commit; requests
    only read the database and keep being answered) until the outbox holds a backlog."""
    dep = local_deploy(tmp_path, trained_artifacts["strong"])
    engine = dep.engine()
    port, env = free_port(), dep.env()
    server = traffic = after = None
    writer = sqlite3.connect(tmp_path / "qf.db", timeout=60, isolation_level=None)
    try:
        server = start_server(env, port, tmp_path / "server.log")
        traffic = Traffic(server.url, dep.auth("expert"), digits, clients=4, feedback_every=2)
        traffic.start()
        wait_until(lambda: len(traffic.predictions) >= 40, timeout=90, what="a burst")
        writer.execute("BEGIN IMMEDIATE")
        wait_until(
            lambda: read_outbox(dep.data_dir)["depth"] >= 40,
            timeout=60,
            what="acknowledged records waiting in the outbox",
        )
        server.kill9()
        killed_at = time.monotonic()
        traffic.stop()
        writer.execute("ROLLBACK")
        left = read_outbox(dep.data_dir)["depth"]

        server = start_server(env, port, tmp_path / "server2.log")
        # the restarted server takes new traffic, and feedback on predictions made before
        after = Traffic(
            server.url,
            dep.auth("expert"),
            digits,
            clients=1,
            feedback_every=1,
            old=list(traffic.predictions)[:20],
            old_every=1,
        ).start()
        after.run_for(2)
        after.stop()
        drain_s = wait_for_flush(engine, dep.data_dir, traffic, after)
        in_flight = [e for e in traffic.no_answer if e[0] <= killed_at]
        print(
            f"\n[drill kill -9] {traffic.summary()}; {len(in_flight)} requests in flight at "
            f"the kill; {left} records were left in the outbox; after the restart "
            f"{after.summary()}; waited {drain_s:.1f}s for the flush"
        )
        assert left >= 40, f"only {left} records were waiting in the outbox at the kill"
        assert not traffic.refused, traffic.refused[:3]
        assert_nothing_lost(engine, dep, traffic, server_url=server.url)
        assert_nothing_lost(engine, dep, after, server_url=server.url)
        assert not after.refused and not after.no_answer, (after.refused + after.no_answer)[:3]
    finally:
        for t in (traffic, after):
            if t is not None:
                t.stop()
        writer.close()  # releases the lock if still held
        if server is not None:
            server.stop()
        engine.dispose()

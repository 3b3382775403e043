"""Quarkflow against its peers on the same work (issue #19): LitServe 0.2.19 (dynamic batching),
BentoML 1.4.40 (adaptive batching), a bare FastAPI endpoint (no batching) and `quarkflow serve`
(logging on: every prediction durable in the outbox before the answer, then flushed to the
database and the image store), all serving one resnet18@224 ONNX file (random init: speed does
not depend on the weights) with ONNX Runtime, 2 intra-op threads, and the same preprocessing
(Quarkflow's ``imagenet224`` preset; the peers copy its numbers in ``bench/peers/common.py``).

Each peer runs from its own venv, ``bench/.venvs/<name>`` (created on first run with
``python -m venv`` + ``pip install -r bench/peers/requirements-<name>.txt``; no torch there).
Async httpx clients at 1 / 4 / 16 / 32 concurrent requests, two payloads (a 28 px PNG MNIST
digit; a 224 px JPEG photo), a pool of distinct images per payload; the servers take turns
point by point (interleaved, the order rotated every pass) and every Quarkflow point ends only
once its outbox has drained, so one server's backlog never runs during another's turn. The
in-process ceiling is Quarkflow's ``Predictor`` at batch 32 including decoding, measured in the
same run. A soak (Quarkflow, 16 clients, photos) checks for sag.

Settings (environment):

- ``BENCH_PEERS_POINT_S`` seconds per point (default 10), ``BENCH_PEERS_REPEATS`` passes (3)
- ``BENCH_PEERS_CLIENTS`` (``1,4,16,32``), ``BENCH_PEERS_PAYLOADS`` (``digit,photo``)
- ``BENCH_PEERS_SERVERS`` (``quarkflow,litserve,bentoml,bare``)
- ``BENCH_PEERS_QF_TREES`` more Quarkflow servers, ``name=/path/to/a/checkout,...``, each run
  from that tree's code (for measuring a change against the code before it)
- ``BENCH_PEERS_SOAK_S`` soak length (300; 0 skips it), ``BENCH_PEERS_SOAK_SERVERS``
  (``quarkflow``; several take the soak's windows in turns)
- ``BENCH_PEERS_DB`` ``sqlite`` (default, like the outside benchmark) or ``postgresql``
  (``QF_TEST_POSTGRES_URL``'s server, a fresh database per Quarkflow server)
- ``BENCH_PEERS_OUT`` where to write (``bench/results/serving_peers.json``)

``python -m bench bench_serving_peers``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from bench import bench_serving

ROOT = Path(__file__).resolve().parent.parent
PEERS = Path(__file__).parent / "peers"
VENVS = Path(__file__).parent / ".venvs"
OUT = Path(
    os.environ.get("BENCH_PEERS_OUT", Path(__file__).parent / "results" / "serving_peers.json")
)
POINT_S = float(os.environ.get("BENCH_PEERS_POINT_S", "10"))
REPEATS = int(os.environ.get("BENCH_PEERS_REPEATS", "3"))
CLIENTS = [int(c) for c in os.environ.get("BENCH_PEERS_CLIENTS", "1,4,16,32").split(",")]
PAYLOADS = os.environ.get("BENCH_PEERS_PAYLOADS", "digit,photo").split(",")
SERVERS = os.environ.get("BENCH_PEERS_SERVERS", "quarkflow,litserve,bentoml,bare").split(",")
QF_TREES = [t for t in os.environ.get("BENCH_PEERS_QF_TREES", "").split(",") if t]
SOAK_S = float(os.environ.get("BENCH_PEERS_SOAK_S", "300"))
SOAK_SERVERS = os.environ.get("BENCH_PEERS_SOAK_SERVERS", "quarkflow").split(",")
DB = os.environ.get("BENCH_PEERS_DB", "sqlite")
ADMIN_PG = os.environ.get(
    "QF_TEST_POSTGRES_URL",
    "postgresql+psycopg2://quarkflow:quarkflow@127.0.0.1:5432/quarkflow_test",
)
THREADS = 2
MAX_BATCH = 32
PEER_WAIT_MS = 5.0  # LitServe's batch timeout (the outside benchmark's setting)
POOL = 64  # distinct images per payload
SECRET = bench_serving.SECRET  # approve_champion makes its tokens with it
PEER_NAMES = ("litserve", "bentoml", "bare")


# ------------------------------------------------------------------ payloads and model


def payloads() -> dict[str, list[bytes]]:
    """``digit``: MNIST digits as 28 px PNG; ``photo``: 224 px JPEG crops of skimage photos."""
    import skimage.data
    from PIL import Image

    from quarkflow_core.demo_data import demo_pngs

    digits, _ = demo_pngs(limit=POOL)
    rng = np.random.default_rng(0)
    photos = []
    sources = [skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea()]
    for i in range(POOL):
        src = sources[i % len(sources)]
        h, w = src.shape[:2]
        side = int(min(h, w) * rng.uniform(0.6, 1.0))
        top, left = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
        crop = Image.fromarray(src[top : top + side, left : left + side]).resize((224, 224))
        buf = io.BytesIO()
        crop.save(buf, "JPEG", quality=90)
        photos.append(buf.getvalue())
    return {"digit": digits, "photo": photos}


def make_artifact(work: Path) -> Path:
    """resnet18@224, 10 classes, random init, with its ONNX export (``model.onnx``)."""
    import torch

    from quarkflow_core.ml.artifacts import load_artifact, save_artifact
    from quarkflow_core.ml.models import get_model
    from quarkflow_core.ml.transforms import eval_preset
    from quarkflow_core.ml.variants import export_artifact

    torch.manual_seed(0)
    art = work / "resnet18"
    save_artifact(
        art,
        model=get_model("resnet18", num_classes=10, in_channels=3).eval(),
        architecture="resnet18",
        classes=[f"class{i}" for i in range(10)],
        in_channels=3,
        preset=eval_preset("imagenet224"),
    )
    images = torch.randint(0, 255, (4, 3, 224, 224), dtype=torch.uint8)
    export_artifact(load_artifact(art), fmt="onnx", images=images)
    return art


def ceiling(art: Path, pool: list[bytes], seconds: float) -> dict[str, float]:
    """In process: Quarkflow's Predictor with decoding, batch 32 img/s and batch-1 p50 ms."""
    from quarkflow_core.predictor import Predictor

    pred = Predictor.from_artifact(art, version=1, backend="onnxruntime", threads=THREADS)
    pred.warm_up(3)
    lat = []
    for i in range(40):
        t = time.perf_counter()
        pred.probabilities(pred.preprocess(pool[i % len(pool)])[None])
        lat.append((time.perf_counter() - t) * 1000)
    n, i, t0 = 0, 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        batch = [pool[(i + j) % len(pool)] for j in range(MAX_BATCH)]
        pred.probabilities(np.stack([pred.preprocess(b) for b in batch]))
        n, i = n + MAX_BATCH, i + MAX_BATCH
    return {
        "batch32_img_s": n / (time.perf_counter() - t0),
        "batch1_p50_ms": statistics.median(lat),
    }


# ------------------------------------------------------------------ servers


def ensure_venv(name: str) -> Path:
    """``bench/.venvs/<name>`` with ``requirements-<name>.txt`` installed (once)."""
    venv = VENVS / name
    req = PEERS / f"requirements-{name}.txt"
    stamp = venv / f".installed-{hashlib.sha256(req.read_bytes()).hexdigest()[:12]}"
    python = venv / "bin" / "python"
    if stamp.is_file():
        return python
    if not python.is_file():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)  # noqa: S603
    subprocess.run(  # noqa: S603 - pinned requirements of our own
        [str(python), "-m", "pip", "install", "-q", "-r", str(req)], check=True
    )
    for old in venv.glob(".installed-*"):
        old.unlink()
    stamp.touch()
    return python


def _tree_sum(pid: int, measure: Any) -> float:
    """``measure(process)`` summed over a process and all its children (those that exit
    meanwhile are skipped); NaN when the process itself is gone."""
    import psutil

    try:
        proc = psutil.Process(pid)
        procs = [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return float("nan")
    total = 0.0
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            total += measure(p)
    return total


def rss_mb(pid: int) -> float:
    """Resident memory of a process and all its children, MB."""
    return _tree_sum(pid, lambda p: p.memory_info().rss) / 2**20


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) of a process and all its children."""
    return _tree_sum(pid, lambda p: sum(p.cpu_times()[:2]))  # (user, system, ...)


@dataclass
class Server:
    name: str
    kind: str  # quarkflow | litserve | bentoml | bare
    url: str
    path: str
    field: str
    proc: subprocess.Popen | None = None
    headers: dict[str, str] = field(default_factory=dict)
    log: Path | None = None
    idle_rss_mb: float = 0.0
    cleanup: list[Any] = field(default_factory=list)

    def drained(self, timeout_s: float = 120.0) -> tuple[int, float]:
        """Wait until a Quarkflow server's outbox is empty: (depth when asked, seconds)."""
        if self.kind != "quarkflow":
            return 0, 0.0
        t0 = time.perf_counter()
        first = None
        while time.perf_counter() - t0 < timeout_s:
            depth = httpx.get(self.url + "/readyz", timeout=30).json()["checks"]["outbox"]["depth"]
            first = depth if first is None else first
            if depth == 0:
                break
            time.sleep(0.1)
        return int(first or 0), time.perf_counter() - t0


def stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM to a peer's process group (the server and the workers it started), then
    SIGKILL after 20 s."""
    import signal

    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(server: Server, health: str, timeout_s: float = 300) -> None:
    from quarkflow_core.orchestration import wait_for_http

    if not wait_for_http(server.url + health, timeout_s=timeout_s, proc=server.proc):
        tail = server.log.read_text()[-3000:] if server.log else ""
        raise RuntimeError(f"{server.name} did not start:\n{tail}")


def start_peer(kind: str, onnx: Path, work: Path) -> Server:
    python = ensure_venv(kind)
    port = _port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("QF_", "PYTHON"))},
        "PEER_ONNX": str(onnx),
        "PEER_THREADS": str(THREADS),
        "PEER_MAX_BATCH": str(MAX_BATCH),
        "PEER_BATCH_WAIT_MS": str(PEER_WAIT_MS),
        "BENTOML_DO_NOT_TRACK": "True",
        "LITSERVE_DISABLE_TRACKING": "1",
    }
    if kind == "bentoml":
        argv = [str(python), "-m", "bentoml", "serve", "server_bentoml:Resnet", "--port", str(port)]
        argv += ["--host", "127.0.0.1"]
        health, path, fld = "/readyz", "/predict", "files"
    else:
        argv = [str(python), f"server_{kind}.py", str(port)]
        health, path, fld = "/health", "/predict", "file"
    log = work / f"{kind}.log"
    server = Server(kind, kind, f"http://127.0.0.1:{port}", path, fld, log=log)
    server.proc = subprocess.Popen(  # noqa: S603 - our own scripts, fixed arguments
        argv,
        cwd=PEERS,
        env=env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: stopped with its workers
    )
    _wait(server, health)
    return server


def _quarkflow_db(work: Path, name: str) -> tuple[str, str | None]:
    """(database url, Postgres database to drop afterwards)."""
    if DB == "postgresql":
        from sqlalchemy import text
        from sqlalchemy.engine import make_url

        from quarkflow_core.database import make_engine

        db = f"qf_peers_{uuid.uuid4().hex[:8]}"
        admin = make_engine(ADMIN_PG, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{db}"'))
        admin.dispose()
        return make_url(ADMIN_PG).set(database=db).render_as_string(hide_password=False), db
    return f"sqlite:///{work}/{name}.db", None


def _drop_pg(db: str) -> None:
    from sqlalchemy import text

    from quarkflow_core.database import make_engine

    admin = make_engine(ADMIN_PG, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)'))
    admin.dispose()


def start_quarkflow(name: str, tree: Path, art: Path, work: Path) -> Server:
    """`quarkflow serve` from ``tree``'s code, on a fresh database + local folder, with ``art``
    registered and approved as champion."""
    home = work / name
    home.mkdir()
    db_url, pg_db = _quarkflow_db(work, name)
    storage_url = f"file://{home}/store"
    token = bench_serving.approve_champion(art, db_url, storage_url, cache_root=home / "cache")
    port = _port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("QF_", "PYTHON"))},
        "QF_DATA_DIR": str(home / "data"),
        "QF_DATABASE_URL": db_url,
        "QF_STORAGE_URL": storage_url,
        "QF_SECRET_KEY": SECRET,
        "QF_SERVING_BACKEND": "onnxruntime",
        "QF_GRPC_PORT": "0",  # no gRPC listener (several servers run side by side)
        "GRADIO_ANALYTICS_ENABLED": "False",
    }
    log = home / "server.log"
    server = Server(
        name,
        "quarkflow",
        f"http://127.0.0.1:{port}",
        "/api/v1/predictions",
        "file",
        headers={"Authorization": f"Bearer {token}"},
        log=log,
    )
    if pg_db:
        server.cleanup.append(lambda: _drop_pg(pg_db))
    server.proc = subprocess.Popen(  # noqa: S603 - our own CLI, fixed arguments
        [sys.executable, "-m", "app.cli", "serve", "--port", str(port)],
        cwd=tree,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=log.open("wb"),
    )
    _wait(server, "/readyz")
    return server


# ------------------------------------------------------------------ load


async def _load(server: Server, pool: list[bytes], clients: int, seconds: float) -> dict:
    lat: list[float] = []
    statuses: dict[str, int] = {}
    ctype = "image/png" if pool[0][:4] == b"\x89PNG" else "image/jpeg"
    fname = "a.png" if ctype == "image/png" else "a.jpg"
    stop = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    counter = iter(range(10**9))
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:

        async def worker() -> None:
            while time.perf_counter() < stop:
                data = pool[next(counter) % len(pool)]
                t = time.perf_counter()
                try:
                    r = await client.post(
                        server.url + server.path,
                        files={server.field: (fname, data, ctype)},
                        headers=server.headers,
                    )
                    code = str(r.status_code)
                except httpx.HTTPError as exc:
                    code = type(exc).__name__
                lat.append((time.perf_counter() - t) * 1000)
                statuses[code] = statuses.get(code, 0) + 1

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        elapsed = time.perf_counter() - t0
    lat.sort()
    ok = statuses.get("200", 0)
    return {
        "seconds": round(elapsed, 2),
        "requests": len(lat),
        "img_s": ok / elapsed,
        "p50_ms": lat[len(lat) // 2] if lat else float("nan"),
        "p99_ms": lat[min(len(lat) - 1, int(len(lat) * 0.99))] if lat else float("nan"),
        "errors": len(lat) - ok,
        "statuses": statuses,
    }


def batches(server: Server) -> tuple[float, float]:
    """A Quarkflow server's micro-batches so far: (images, batches), from /metrics."""
    if server.kind != "quarkflow":
        return 0.0, 0.0
    text = httpx.get(server.url + "/metrics", timeout=30).text
    found = {}
    for line in text.splitlines():
        for key in ("qf_batch_size_sum", "qf_batch_size_count"):
            if line.startswith(key + " "):
                found[key] = float(line.split()[1])
    return found.get("qf_batch_size_sum", 0.0), found.get("qf_batch_size_count", 0.0)


def run_point(server: Server, pool: list[bytes], clients: int, seconds: float) -> dict:
    """One measured point with the server's peak RSS (sampled), CPU and mean micro-batch,
    then its drain."""
    images0, batches0 = batches(server)
    peak = [rss_mb(server.proc.pid)]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.5):
            peak.append(rss_mb(server.proc.pid))

    sampler = threading.Thread(target=sample, daemon=True)
    cpu0 = cpu_s(server.proc.pid)
    sampler.start()
    try:
        res = asyncio.run(_load(server, pool, clients, seconds))
    finally:
        stop.set()
        sampler.join()
    res["server_cpu_cores"] = (cpu_s(server.proc.pid) - cpu0) / res["seconds"]
    res["loadavg_1m"] = os.getloadavg()[0]  # the machine's load: others' work too
    res["rss_mb"] = max(peak)
    images1, batches1 = batches(server)
    if batches1 > batches0:
        res["mean_batch"] = (images1 - images0) / (batches1 - batches0)
    res["outbox_depth_at_end"], res["drain_s"] = server.drained()
    return res


def soak(servers: list[Server], pool: list[bytes], seconds: float, clients: int = 16) -> dict:
    """Each server under ``clients`` for ``seconds``, in ten windows that the servers take in
    turns (so a change in the machine's load shows in all of them): throughput, p50, RSS per
    window; sag is the last window's img/s against the best of the first three, and
    ``sag_vs_<other>`` the same after dividing by the other server's windows."""
    windows: dict[str, list[dict]] = {s.name: [] for s in servers}
    for _ in range(10):
        for server in servers:
            w = run_point(server, pool, clients, seconds / 10)
            keys = ("img_s", "p50_ms", "errors", "rss_mb", "loadavg_1m")
            windows[server.name].append({k: w[k] for k in keys})
    out = {}
    for server in servers:
        ws = windows[server.name]
        first = max(w["img_s"] for w in ws[:3])
        out[server.name] = {
            "clients": clients,
            "seconds": seconds,
            "windows": ws,
            "sag": 1.0 - ws[-1]["img_s"] / first,
            "rss_growth_mb": ws[-1]["rss_mb"] - ws[0]["rss_mb"],
            "errors": sum(w["errors"] for w in ws),
        }
    for server in servers:
        for other in servers:
            if other is server:
                continue
            rel = [
                a["img_s"] / b["img_s"]
                for a, b in zip(windows[server.name], windows[other.name], strict=True)
            ]
            out[server.name][f"sag_vs_{other.name}"] = 1.0 - rel[-1] / max(rel[:3])
    return out


# ------------------------------------------------------------------ report


def _summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarize(runs: list[dict], ceilings: dict[str, list[dict]], names: list[str]) -> dict:
    table: dict[str, Any] = {}
    for payload in PAYLOADS:
        ceil = statistics.median(c["batch32_img_s"] for c in ceilings[payload])
        b1 = statistics.median(c["batch1_p50_ms"] for c in ceilings[payload])
        table[payload] = {"ceiling_img_s": ceil, "in_process_batch1_p50_ms": b1, "clients": {}}
        for clients in CLIENTS:
            row: dict[str, Any] = {}
            for name in names:
                pts = [
                    r
                    for r in runs
                    if r["server"] == name and r["payload"] == payload and r["clients"] == clients
                ]
                if not pts:
                    continue
                row[name] = {
                    "img_s": _summary([p["img_s"] for p in pts]),
                    "p50_ms": _summary([p["p50_ms"] for p in pts]),
                    "p99_ms": _summary([p["p99_ms"] for p in pts]),
                    "errors": sum(p["errors"] for p in pts),
                    "rss_mb": max(p["rss_mb"] for p in pts),
                    "server_cpu_cores": statistics.median(p["server_cpu_cores"] for p in pts),
                }
            peers = [n for n in row if n in PEER_NAMES]
            best = max(peers, key=lambda n: row[n]["img_s"]["median"]) if peers else None
            for name, cell in row.items():
                cell["vs_ceiling"] = cell["img_s"]["median"] / ceil
                if best:
                    cell["vs_best_peer"] = cell["img_s"]["median"] / row[best]["img_s"]["median"]
                    # per pass: the same pass's best peer, for a range of the ratio
                    ratios = []
                    for r in (p for p in runs if p["server"] == name):
                        if r["payload"] != payload or r["clients"] != clients:
                            continue
                        same = [
                            p["img_s"]
                            for p in runs
                            if p["server"] in peers
                            and p["pass"] == r["pass"]
                            and p["payload"] == payload
                            and p["clients"] == clients
                        ]
                        if same:
                            ratios.append(r["img_s"] / max(same))
                    cell["vs_best_peer_per_pass"] = _summary(ratios) if ratios else None
            row["best_peer"] = best
            table[payload]["clients"][str(clients)] = row
    return table


def targets(table: dict, rss: dict[str, float], soaks: dict[str, dict], name: str) -> dict:
    out: dict[str, Any] = {}
    for payload, t in table.items():
        for clients in (4, 16, 32):
            cell = t["clients"].get(str(clients), {}).get(name)
            if cell and "vs_best_peer" in cell:
                out[f"{payload}_{clients}_vs_best_peer"] = round(cell["vs_best_peer"], 3)
        cells = [c[name]["vs_ceiling"] for c in t["clients"].values() if name in c]
        if cells:
            out[f"{payload}_best_vs_ceiling"] = round(max(cells), 3)
        one = t["clients"].get("1", {}).get(name)
        if one:
            out[f"{payload}_p50_overhead_1_client_ms"] = round(
                one["p50_ms"]["median"] - t["in_process_batch1_p50_ms"], 2
            )
    peers = [v for k, v in rss.items() if k in PEER_NAMES]
    if peers and name in rss:
        out["rss_vs_largest_peer"] = round(rss[name] / max(peers), 2)
    if name in soaks:
        out["soak_sag"] = round(soaks[name]["sag"], 3)
    return out


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="qf-bench-peers-"))
    servers: list[Server] = []
    try:
        pools = {k: v for k, v in payloads().items() if k in PAYLOADS}
        art = make_artifact(work)
        onnx = art / "model.onnx"
        trees = [(n, Path(p)) for n, p in (t.split("=", 1) for t in QF_TREES)]
        if "quarkflow" in SERVERS:
            trees.insert(0, ("quarkflow", ROOT))
        for name, tree in trees:
            servers.append(start_quarkflow(name, tree, art, work))
            print(f"started {name} ({tree})", flush=True)
        for kind in (s for s in SERVERS if s in PEER_NAMES):
            servers.append(start_peer(kind, onnx, work))
            print(f"started {kind}", flush=True)
        for server in servers:  # warm-up: every payload, a few concurrent clients
            for pool in pools.values():
                res = asyncio.run(_load(server, pool, 4, 2.0))
                if res["errors"]:
                    tail = server.log.read_text()[-2000:] if server.log else ""
                    raise RuntimeError(f"{server.name}: {res['statuses']}\n{tail}")
            server.drained()
            server.idle_rss_mb = rss_mb(server.proc.pid)
        runs: list[dict] = []
        ceilings: dict[str, list[dict]] = {p: [] for p in pools}
        t_start, load_start = time.time(), os.getloadavg()
        for rep in range(REPEATS):
            for payload, pool in pools.items():
                ceilings[payload].append(ceiling(art, pool, min(POINT_S, 6.0)))
                for clients in CLIENTS:
                    k = rep + clients
                    order = servers[k % len(servers) :] + servers[: k % len(servers)]
                    for server in order:
                        res = run_point(server, pool, clients, POINT_S)
                        runs.append(
                            {
                                "server": server.name,
                                "pass": rep,
                                "payload": payload,
                                "clients": clients,
                                **res,
                            }
                        )
                        print(
                            f"pass {rep} {payload:5} {clients:>2} clients {server.name:>12}: "
                            f"{res['img_s']:6.1f} img/s p50 {res['p50_ms']:7.1f} ms "
                            f"p99 {res['p99_ms']:7.1f} ms err {res['errors']} "
                            f"rss {res['rss_mb']:.0f} MB cpu {res['server_cpu_cores']:.2f} "
                            f"drain {res['drain_s']:.1f}s batch {res.get('mean_batch', 0):.1f}",
                            flush=True,
                        )
        names = [s.name for s in servers]
        table = summarize(runs, ceilings, names)
        rss = {s.name: max(r["rss_mb"] for r in runs if r["server"] == s.name) for s in servers}
        soaks = {}
        soaked = [s for s in servers if s.name in SOAK_SERVERS or s.kind in SOAK_SERVERS]
        if SOAK_S > 0 and soaked:
            soaks = soak(soaked, pools.get("photo") or next(iter(pools.values())), SOAK_S)
            for name, res in soaks.items():
                print(f"soak {name}: sag {res['sag']:.3f}", flush=True)
        result = {
            "settings": {
                "model": "resnet18@224, 10 classes, random init, ONNX, onnxruntime CPU",
                "ort_intra_op_threads": THREADS,
                "max_batch": MAX_BATCH,
                "litserve_batch_timeout_ms": PEER_WAIT_MS,
                "payloads": {k: f"{len(v)} distinct images" for k, v in pools.items()},
                "point_s": POINT_S,
                "repeats": REPEATS,
                "clients": CLIENTS,
                "quarkflow_database": DB,
                "quarkflow_storage": "local folder",
                "quarkflow_trees": {n: str(p) for n, p in trees},
                "soak_s": SOAK_S,
            },
            "machine": {
                "cpus": os.cpu_count(),
                "platform": platform.platform(),
                "python": platform.python_version(),
                "loadavg_start": load_start,
                "loadavg_end": os.getloadavg(),
                "loadavg_1m_during_points": _summary([r["loadavg_1m"] for r in runs]),
                "wall_s": round(time.time() - t_start, 1),
                "note": "load generator (async httpx) runs on the same machine",
            },
            "idle_rss_mb": {s.name: s.idle_rss_mb for s in servers},
            "peak_rss_mb": rss,
            "ceiling_runs": ceilings,
            "table": table,
            "targets": {n: targets(table, rss, soaks, n) for n in names if n not in PEER_NAMES},
            "soak": soaks,
            "runs": runs,
        }
        OUT.parent.mkdir(parents=True, exist_ok=True)
        OUT.write_text(json.dumps(result, indent=2))
        print(json.dumps(result["targets"], indent=2))
        print(f"wrote {OUT}")
    finally:
        from quarkflow_core.orchestration import stop_process

        for server in servers:
            if server.proc is not None and server.kind != "quarkflow":
                stop_group(server.proc)
            elif server.proc is not None:
                stop_process(server.proc, timeout_s=20)
            for fn in server.cleanup:
                fn()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

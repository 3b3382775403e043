"""Serving load benchmark: the real API (`quarkflow serve` in its own process, logging on,
Postgres when reachable, local storage) under 1 / 8 / 16 / 32 concurrent async httpx clients,
next to the raw in-process throughput and latency of the same model and backend measured in
the same run.

Model: resnet18 at 224 (random init: speed does not depend on the weights), exported to ONNX
and served with onnxruntime; the client sends a real photograph (skimage's astronaut, JPEG).

Targets (issue #5): model-bound API img/s at 16 clients >= 0.85x raw batched throughput;
single-client API p50 minus raw batch-1 p50 <= 5 ms; 32 clients for 60 s with zero 5xx and
flat server memory. LitServe, BentoML and a bare FastAPI endpoint are measured against the
same API by bench/bench_serving_peers.py (each in its own venv).

Writes bench/results/serving.json. QF_BENCH_SOAK_S shortens the 60 s soak for a quick look.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from quarkflow_core.orchestration import stop_process, wait_for_http

RESULTS = Path(__file__).parent / "results" / "serving.json"
ADMIN_PG = os.environ.get(
    "QF_TEST_POSTGRES_URL",
    "postgresql+psycopg2://quarkflow:quarkflow@127.0.0.1:5432/quarkflow_test",
)
LEVELS = (1, 8, 16, 32)
LEVEL_S = 12.0
SOAK_S = float(os.environ.get("QF_BENCH_SOAK_S", "60"))
SECRET = "bench-secret"  # noqa: S105 - a throw-away database


def _photo_jpeg() -> bytes:
    import skimage.data
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(skimage.data.astronaut()).resize((256, 256)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _database() -> tuple[str, str]:
    """A fresh Postgres database when the server is up, else SQLite: (url, kind)."""
    from sqlalchemy import text
    from sqlalchemy.engine import make_url

    from quarkflow_core.database import make_engine

    name = f"qf_bench_{uuid.uuid4().hex[:8]}"
    try:
        admin = make_engine(ADMIN_PG, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        admin.dispose()
        return make_url(ADMIN_PG).set(database=name).render_as_string(
            hide_password=False
        ), "postgresql"
    except Exception as exc:
        print(f"Postgres not reachable ({exc}); using SQLite")
        return "", "sqlite"


def _drop(url: str) -> None:
    from sqlalchemy import text
    from sqlalchemy.engine import make_url

    from quarkflow_core.database import make_engine

    admin = make_engine(ADMIN_PG, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{make_url(url).database}" WITH (FORCE)'))
    admin.dispose()


def approve_champion(art: Path, db_url: str, storage_url: str, *, cache_root: Path) -> str:
    """Migrate ``db_url``, make an ML lead and a domain expert, register ``art`` and approve it
    as champion; returns the expert's token (what the benchmark's clients send)."""
    from sqlalchemy.orm import Session

    from quarkflow_core import migrations, registry
    from quarkflow_core.database import make_engine
    from quarkflow_core.schema import Role
    from quarkflow_core.storage import storage_from_url
    from quarkflow_core.users import create_token, create_user

    migrations.upgrade(db_url)
    engine = make_engine(db_url)
    storage = storage_from_url(storage_url)
    with Session(engine, expire_on_commit=False) as s:
        lead = create_user(session=s, username="bench-lead", role=Role.ML_LEAD)
        expert = create_user(session=s, username="bench-expert", role=Role.DOMAIN_EXPERT)
        _, token = create_token(session=s, user=expert, secret=SECRET)
        s.commit()
        row = registry.register_version(
            session=s, storage=storage, artifact_dir=art, created_by="bench"
        )
        registry.approve(
            session=s,
            storage=storage,
            version=row,
            user=lead,
            reason="benchmark champion",
            cache_root=cache_root,
        )
    engine.dispose()
    return token


def _make_champion(work: Path, db_url: str, storage_url: str) -> tuple[Path, str]:
    """A resnet18 artifact with an ONNX export, registered and approved; returns (dir, token)."""
    import torch

    from quarkflow_core.ml.artifacts import load_artifact, save_artifact
    from quarkflow_core.ml.models import get_model
    from quarkflow_core.ml.transforms import eval_preset
    from quarkflow_core.ml.variants import export_artifact

    torch.manual_seed(0)
    preset = eval_preset("imagenet224")
    art = work / "resnet18"
    save_artifact(
        art,
        model=get_model("resnet18", num_classes=10, in_channels=3).eval(),
        architecture="resnet18",
        classes=[f"class{i}" for i in range(10)],
        in_channels=3,
        preset=preset,
    )
    images = torch.randint(0, 255, (4, 3, 224, 224), dtype=torch.uint8)
    export_artifact(load_artifact(art), fmt="onnx", images=images)
    token = approve_champion(art, db_url, storage_url, cache_root=work / "cache")
    return art, token


def _raw(art: Path, photo: bytes, threads: int | None) -> dict[str, Any]:
    """In-process: batch-1 p50 (preprocess + model, as the API does per image) and batched
    img/s of the same predictor."""
    from quarkflow_core.predictor import Predictor

    pred = Predictor.from_artifact(art, version=1, backend="onnxruntime", threads=threads)
    arr = pred.preprocess(photo)
    pred.warm_up(5)
    lat = []
    for _ in range(60):
        t = time.perf_counter()
        pred.probabilities(pred.preprocess(photo)[None])
        lat.append((time.perf_counter() - t) * 1000)
    out: dict[str, Any] = {"batch1_p50_ms": statistics.median(lat)}
    for batch in (8, 16, 32):
        x = np.stack([arr] * batch)
        pred.probabilities(x)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < 4.0:
            pred.probabilities(np.stack([pred.preprocess(photo) for _ in range(batch)]))
            n += batch
        out[f"batch{batch}_img_s"] = n / (time.perf_counter() - t0)
    out["best_batched_img_s"] = max(out[f"batch{b}_img_s"] for b in (8, 16, 32))
    return out


async def _load(url: str, token: str, photo: bytes, clients: int, seconds: float) -> dict:
    lat: list[float] = []
    statuses: dict[int, int] = {}
    stop = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:

        async def worker() -> None:
            while time.perf_counter() < stop:
                t = time.perf_counter()
                r = await client.post(
                    url + "/api/v1/predictions",
                    files={"file": ("a.jpg", photo, "image/jpeg")},
                    headers={"Authorization": f"Bearer {token}"},
                )
                lat.append((time.perf_counter() - t) * 1000)
                statuses[r.status_code] = statuses.get(r.status_code, 0) + 1

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        elapsed = time.perf_counter() - t0
    lat.sort()
    return {
        "clients": clients,
        "seconds": round(elapsed, 2),
        "requests": len(lat),
        "img_s": len(lat) / elapsed,
        "p50_ms": lat[len(lat) // 2],
        "p99_ms": lat[min(len(lat) - 1, int(len(lat) * 0.99))],
        "statuses": {str(k): v for k, v in statuses.items()},
        "server_5xx": sum(v for k, v in statuses.items() if k >= 500),
    }


def _cpu_s(pid: int) -> float:
    """utime + stime of a process, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="qf-bench-serving-"))
    db_url, db_kind = _database()
    if not db_url:
        db_url = f"sqlite:///{work}/qf.db"
    storage_url = f"file://{work}/store"
    photo = _photo_jpeg()
    server = None
    try:
        art, token = _make_champion(work, db_url, storage_url)
        raw = _raw(art, photo, threads=None)
        port = 18000 + os.getpid() % 1000
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("QF_")},
            "QF_DATA_DIR": str(work / "data"),
            "QF_DATABASE_URL": db_url,
            "QF_STORAGE_URL": storage_url,
            "QF_SECRET_KEY": SECRET,
            "QF_SERVING_BACKEND": "onnxruntime",
            "GRADIO_ANALYTICS_ENABLED": "False",
        }
        server = subprocess.Popen(  # noqa: S603 - our own CLI, fixed arguments
            [sys.executable, "-m", "app.cli", "serve", "--port", str(port)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=open(work / "server.log", "wb"),  # noqa: SIM115
        )
        url = f"http://127.0.0.1:{port}"
        if not wait_for_http(url + "/readyz", timeout_s=120, proc=server):
            raise RuntimeError((work / "server.log").read_text()[-2000:])
        asyncio.run(_load(url, token, photo, 4, 3.0))  # warm-up
        levels = []
        for clients in LEVELS:
            client_cpu, server_cpu = time.process_time(), _cpu_s(server.pid)
            res = asyncio.run(_load(url, token, photo, clients, LEVEL_S))
            # where the 2 cores went: the load generator shares the machine with the server
            res["client_cpu_cores"] = (time.process_time() - client_cpu) / res["seconds"]
            res["server_cpu_cores"] = (_cpu_s(server.pid) - server_cpu) / res["seconds"]
            res["vs_raw_batched"] = res["img_s"] / raw["best_batched_img_s"]
            levels.append(res)
            print(
                f"{clients:>3} clients: {res['img_s']:6.1f} img/s  p50 {res['p50_ms']:6.1f} ms  "
                f"p99 {res['p99_ms']:6.1f} ms  5xx {res['server_5xx']}  cpu: server "
                f"{res['server_cpu_cores']:.2f} client {res['client_cpu_cores']:.2f} cores"
            )
        # The raw reference again, now that the load is over; keep the better of the two
        # measurements (the stricter reference for the ratios).
        again = _raw(art, photo, threads=None)
        raw_runs = [dict(raw), again]
        raw["batch1_p50_ms"] = min(raw["batch1_p50_ms"], again["batch1_p50_ms"])
        for key in [k for k in again if k.endswith("img_s")]:
            raw[key] = max(raw[key], again[key])
        for lv in levels:
            lv["vs_raw_batched"] = lv["img_s"] / raw["best_batched_img_s"]
        rss_before = _rss_mb(server.pid)
        soak = asyncio.run(_load(url, token, photo, 32, SOAK_S))
        rss_after = _rss_mb(server.pid)
        soak.update({"rss_mb_before": rss_before, "rss_mb_after": rss_after})
        print(
            f"soak 32 clients {SOAK_S:.0f}s: {soak['requests']} requests, 5xx "
            f"{soak['server_5xx']}, RSS {rss_before:.0f} -> {rss_after:.0f} MB"
        )
        print(
            f"raw in-process: batch-1 p50 {raw['batch1_p50_ms']:.1f} ms, best batched "
            f"{raw['best_batched_img_s']:.1f} img/s"
        )
        one = levels[0]
        sixteen = next(lv for lv in levels if lv["clients"] == 16)
        result = {
            "machine": {
                "cpus": os.cpu_count(),
                "platform": platform.platform(),
                "loadavg": os.getloadavg(),
            },
            "database": db_kind,
            "model": "resnet18@224, onnxruntime, random init",
            "raw_in_process": raw,
            "raw_in_process_runs": raw_runs,
            "api": levels,
            "soak_32_clients": soak,
            "targets": {
                "api_16_clients_vs_raw_batched": sixteen["vs_raw_batched"],
                "api_16_clients_vs_raw_batched_met": sixteen["vs_raw_batched"] >= 0.85,
                "single_client_p50_overhead_ms": one["p50_ms"] - raw["batch1_p50_ms"],
                "single_client_p50_overhead_met": one["p50_ms"] - raw["batch1_p50_ms"] <= 5.0,
                "soak_zero_5xx": soak["server_5xx"] == 0,
                "soak_rss_growth_mb": rss_after - rss_before,
            },
            "litserve": "see serving_peers.json (bench/bench_serving_peers.py)",
        }
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(result, indent=2))
        print(json.dumps(result["targets"], indent=2))
    finally:
        if server is not None:
            stop_process(server, timeout_s=20)
        if db_kind == "postgresql":
            _drop(db_url)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

"""`quarkflow worker`: starts a local Prefect server (none configured), serves the deployments
with the retrain schedule off, and runs a retrain started from the API on demand."""

from __future__ import annotations

import subprocess
import sys

import httpx
import pytest
from fastapi.testclient import TestClient
from helpers.data import SEED_SIZE
from helpers.serving import deploy, free_port, wait_until
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.api import create_app
from quarkflow_core.demo_data import seed_demo
from quarkflow_core.orchestration import stop_process
from quarkflow_core.schema import ModelVersion

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_worker_serves_deployments_and_runs_retrain_on_demand(tmp_path, trained_artifacts):
    db_url, store_url = f"sqlite:///{tmp_path}/qf.db", f"file://{tmp_path}/store"
    dep = deploy(db_url, store_url, tmp_path / "qf", trained_artifacts["weak"])
    engine = dep.engine()
    with Session(engine) as s:
        seed_demo(session=s, storage=dep.storage(), limit=SEED_SIZE)
        s.commit()
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = dep.env(
        PREFECT_HOME=str(tmp_path / "prefect-home"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        QF_API_URL="",
    )
    log = open(tmp_path / "worker.log", "wb")  # noqa: SIM115 - closed below
    worker = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "worker", "--prefect-port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:

        def deployments() -> dict:
            if worker.poll() is not None:
                raise AssertionError((tmp_path / "worker.log").read_text()[-3000:])
            r = httpx.post(f"{api}/deployments/filter", json={}, timeout=5)
            found = {d["name"]: d for d in r.json()}
            return found if len(found) == 5 else {}

        found = wait_until(deployments, timeout=180, every=1, what="the worker's deployments")
        assert set(found) == {
            "retrain",
            "batch_predict",
            "promote",
            "label_trigger",
            "labelstudio_sync",
        }
        assert found["labelstudio_sync"]["paused"] is True  # no QF_LABELSTUDIO_TOKEN here
        retrain = found["retrain"]
        assert retrain["paused"] is True  # the cron schedule exists but is off by default
        assert retrain["schedules"][0]["schedule"]["cron"] == "0 3 * * 1"

        app = create_app(dep.settings(prefect_api_url=api), with_demo=False, watch=False)
        with TestClient(app) as client:
            body = {"epochs": 2}
            denied = client.post("/api/v1/retrain", json=body, headers=dep.auth("analyst"))
            assert denied.status_code == 403
            started = client.post("/api/v1/retrain", json=body, headers=dep.auth("lead"))
            assert started.status_code == 202, started.text
            run_id = started.json()["flow_run_id"]

        def finished() -> str | None:
            state = httpx.get(f"{api}/flow_runs/{run_id}", timeout=5).json()["state"]["type"]
            if state in ("FAILED", "CRASHED", "CANCELLED"):
                raise AssertionError(f"retrain ended {state}")
            return state if state == "COMPLETED" else None

        wait_until(finished, timeout=300, every=2, what="the retrain flow run on the worker")
        with Session(engine) as s:
            versions = s.scalars(select(ModelVersion.version)).all()
        assert sorted(versions) == [1, 2]
    finally:
        stop_process(worker, timeout_s=30)
        log.close()
        engine.dispose()

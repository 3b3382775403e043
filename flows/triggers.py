"""`label_trigger`: start `retrain` when enough new labels have accumulated since the last
snapshot (QF_RETRAIN_MIN_NEW_LABELS, optionally QF_RETRAIN_MIN_PER_CLASS)."""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.common import db
from quarkflow_core.config import get_settings
from quarkflow_core.orchestration import RETRAIN_DEPLOYMENT


@flow(name="label_trigger", log_prints=True)
def label_trigger(launch: bool = True) -> dict[str, Any]:
    from quarkflow_core.labels import retrain_check

    with db() as s:
        due, why, counts = retrain_check(session=s, settings=get_settings())
    print(why)
    result: dict[str, Any] = {"due": due, "why": why, "counts": counts, "flow_run": None}
    if due and launch:
        from prefect.deployments import run_deployment

        run = run_deployment(RETRAIN_DEPLOYMENT, timeout=0)  # on this flow's own server
        result["flow_run"] = str(run.id)
        print(f"started {RETRAIN_DEPLOYMENT}: flow run {run.id}")
    return result

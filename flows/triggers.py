"""`label_trigger`: start `retrain` when enough new labels have accumulated since the last
snapshot (QF_RETRAIN_MIN_NEW_LABELS, optionally QF_RETRAIN_MIN_PER_CLASS). It counts the
labels of the project its ``project`` parameter names (default ``default``), or of each project
for ``"*"`` (what the schedule passes), and starts that project's retrain."""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.common import EVERY_PROJECT, db, each_project
from quarkflow_core.config import get_settings
from quarkflow_core.orchestration import RETRAIN_DEPLOYMENT
from quarkflow_core.schema import DEFAULT_PROJECT


@flow(name="label_trigger", log_prints=True)
def label_trigger(launch: bool = True, project: str = DEFAULT_PROJECT) -> dict[str, Any]:
    results = {name: check(pid, name, launch) for pid, name in each_project(project)}
    return {"projects": results} if project == EVERY_PROJECT else results[next(iter(results))]


def check(project_id: int, name: str, launch: bool) -> dict[str, Any]:
    from quarkflow_core.labels import retrain_check

    with db() as s:
        due, why, counts = retrain_check(session=s, settings=get_settings(), project_id=project_id)
    print(f"{name}: {why}")
    result: dict[str, Any] = {"due": due, "why": why, "counts": counts, "flow_run": None}
    if due and launch:
        from prefect.deployments import run_deployment

        # on this flow's own server
        run = run_deployment(RETRAIN_DEPLOYMENT, parameters={"project": name}, timeout=0)
        result["flow_run"] = str(run.id)
        print(f"started {RETRAIN_DEPLOYMENT} for {name}: flow run {run.id}")
    return result

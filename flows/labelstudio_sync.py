"""`labelstudio_sync`: push open review items to Label Studio and pull every annotation back
(the periodic fallback for webhooks). Retried with backoff while Label Studio is down; it
duplicates nothing (tasks per image, annotations by id). Each project has its own Label Studio
project; a run syncs the one its ``project`` parameter names (default ``default``), or every
project for ``"*"`` (what the schedule passes)."""

from __future__ import annotations

from typing import Any

from prefect import flow, task

from flows.common import EVERY_PROJECT, db, each_project
from quarkflow_core.config import get_settings
from quarkflow_core.schema import DEFAULT_PROJECT


@task(name="sync", retries=3, retry_delay_seconds=[5, 30, 120])
def sync_task(project_id: int) -> dict[str, Any]:
    from quarkflow_core.review import sync_from_settings

    with db() as s:
        return sync_from_settings(session=s, settings=get_settings(), project_id=project_id)


@flow(name="labelstudio_sync", log_prints=True)
def labelstudio_sync(project: str = DEFAULT_PROJECT) -> dict[str, Any]:
    results = {}
    for project_id, name in each_project(project):
        result = sync_task(project_id)
        print(
            f"{name} (Label Studio project {result['project_id']}): pushed {result['push']}, "
            f"pulled {result['pull']}"
        )
        results[name] = result
    return results if project == EVERY_PROJECT else results[next(iter(results))]

"""`labelstudio_sync`: push open review items to Label Studio and pull every annotation back
(the periodic fallback for webhooks). Retried with backoff while Label Studio is down; it
duplicates nothing (tasks per image, annotations by id)."""

from __future__ import annotations

from typing import Any

from prefect import flow, task

from flows.common import db
from quarkflow_core.config import get_settings


@task(name="sync", retries=3, retry_delay_seconds=[5, 30, 120])
def sync_task() -> dict[str, Any]:
    from quarkflow_core.review import sync_from_settings

    with db() as s:
        return sync_from_settings(session=s, settings=get_settings())


@flow(name="labelstudio_sync", log_prints=True)
def labelstudio_sync() -> dict[str, Any]:
    result = sync_task()
    print(f"project {result['project_id']}: pushed {result['push']}, pulled {result['pull']}")
    return result

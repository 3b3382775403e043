"""`promote`: apply an approval (role ml_lead, same rules as everywhere) and wait until the
serving API reports the new version."""

from __future__ import annotations

import time
from typing import Any

import httpx
from prefect import flow, task

from flows.common import db, storage
from quarkflow_core.config import get_settings


@task(name="approve")
def approve_task(version: str, user: str, reason: str, override: bool) -> dict[str, Any]:
    from quarkflow_core.registry import PolicyConfig, approve, event_dict, model_cache_dir
    from quarkflow_core.users import get_user

    with db() as s:
        event = approve(
            session=s,
            storage=storage(),
            version=version,
            user=get_user(session=s, username=user),
            reason=reason,
            cache_root=model_cache_dir(),
            override=override,
            config=PolicyConfig.from_settings(),
        )
        return event_dict(session=s, event=event)


@task(name="wait-for-serving", retries=0)
def wait_for_serving(api_url: str, version: int, timeout_s: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = httpx.get(api_url.rstrip("/") + "/readyz", timeout=5).json()
            if last["checks"]["model"].get("version") == version:
                return last["checks"]["model"]
        except (httpx.HTTPError, ValueError, KeyError) as exc:
            last = repr(exc)
        time.sleep(0.5)
    raise TimeoutError(f"{api_url} still serves {last!r} after {timeout_s:.0f}s, not v{version}")


@flow(name="promote", log_prints=True)
def promote(
    version: str,
    user: str,
    reason: str,
    override: bool = False,
    api_url: str | None = None,
    timeout_s: float = 120.0,
) -> dict[str, Any]:
    event = approve_task(version, user, reason, override)
    print(f"v{event['to_version']} approved by {event['actor']}")
    url = api_url or get_settings().api_url
    if url:
        event["serving"] = wait_for_serving(url, event["to_version"], timeout_s)
        print(f"{url} now serves v{event['to_version']}")
    return event

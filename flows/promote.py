"""`promote`: apply an approval (role ml_lead, same rules as everywhere) and wait until the
serving API reports the new version. One project per run (parameter ``project``, default
``default``): its version, its champion, the role the user has in it."""

from __future__ import annotations

import time
from typing import Any

import httpx
from prefect import flow, task

from flows.common import db, project_name, resolve_project, storage
from quarkflow_core.config import get_settings
from quarkflow_core.schema import DEFAULT_PROJECT


@task(name="approve")
def approve_task(
    version: str, user: str, reason: str, override: bool, project_id: int
) -> dict[str, Any]:
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
            config=PolicyConfig.for_project(session=s, project_id=project_id),
            project_id=project_id,
        )
        return event_dict(session=s, event=event)


@task(name="wait-for-serving", retries=0)
def wait_for_serving(
    api_url: str, version: int, timeout_s: float, project: str = DEFAULT_PROJECT
) -> dict[str, Any]:
    """Until ``/readyz`` says the project is served with ``version`` (the default project's
    model is ``checks.model``, every project's is under ``checks.projects``)."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = httpx.get(api_url.rstrip("/") + "/readyz", timeout=5).json()
            checks = last["checks"]
            served = checks["model"] if project == DEFAULT_PROJECT else checks["projects"][project]
            if served.get("version") == version:
                return served
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
    project: str = DEFAULT_PROJECT,
) -> dict[str, Any]:
    project_id = resolve_project(project)
    event = approve_task(version, user, reason, override, project_id)
    print(f"v{event['to_version']} approved by {event['actor']}")
    url = api_url or get_settings().api_url
    if url:
        name = project_name(project_id)  # /readyz names projects; the run may give an id
        event["serving"] = wait_for_serving(url, event["to_version"], timeout_s, name)
        print(f"{url} now serves v{event['to_version']}")
    return event

"""Starting a local Prefect server when none is configured (for `quarkflow worker`), and the
two process chores that goes with: waiting for an HTTP service, stopping a child process;
starting a deployment's flow run, and the audited ``start_retrain``."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import httpx

from quarkflow_core.errors import ConfigError
from quarkflow_core.schema import DEFAULT_PROJECT_ID, Role

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from quarkflow_core.users import Actor


@contextmanager
def local_prefect_server(
    api_url: str | None, *, port: int = 4200, timeout_s: float = 120.0
) -> Iterator[str]:
    """Yield ``api_url`` if given; else start `prefect server start` on 127.0.0.1 and stop it
    afterwards."""
    if api_url:
        yield api_url
        return
    url = f"http://127.0.0.1:{port}/api"
    proc = subprocess.Popen(  # noqa: S603 - fixed arguments
        prefect_server_argv(host="127.0.0.1", port=port),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        if not wait_for_http(url + "/health", timeout_s=timeout_s, proc=proc):
            if proc.poll() is not None:
                raise ConfigError(
                    f"QF_PREFECT_API_URL: the local Prefect server exited ({proc.returncode})"
                )
            raise ConfigError(f"QF_PREFECT_API_URL: no Prefect server answered on {url}")
        yield url
    finally:
        stop_process(proc, timeout_s=20)


def prefect_server_argv(*, host: str, port: int) -> list[str]:
    """The command that runs a Prefect server (`quarkflow worker`'s and `quarkflow demo`'s)."""
    return [sys.executable, "-m", "prefect", "server", "start", "--host", host, "--port", str(port)]


def wait_for_http(
    url: str, *, timeout_s: float, proc: subprocess.Popen | None = None, every_s: float = 0.5
) -> bool:
    """True once GET ``url`` answers 200; False when ``timeout_s`` passes first, or as soon as
    ``proc`` (the process that should serve it) has exited."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return False
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(every_s)
    return False


def stop_process(proc: subprocess.Popen, *, timeout_s: float) -> None:
    """SIGTERM (so it can shut down cleanly), then SIGKILL after ``timeout_s``."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


RETRAIN_DEPLOYMENT = "retrain/retrain"


def trigger_deployment(
    api_url: str | None, name: str = RETRAIN_DEPLOYMENT, parameters: dict | None = None
) -> str:
    """Start a deployment's flow run on the worker (never runs it here); returns the run id."""
    if not api_url:
        raise ConfigError(
            "QF_PREFECT_API_URL: no Prefect server is configured; start `quarkflow worker` "
            "and point QF_PREFECT_API_URL at it"
        )
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    try:
        with temporary_settings({PREFECT_API_URL: api_url}):
            run = run_deployment(name, parameters=parameters or {}, timeout=0)
    except Exception as exc:
        raise ConfigError(
            f"QF_PREFECT_API_URL: could not start {name} on {api_url}: {exc}"
        ) from None
    return str(run.id)


def start_retrain(
    *,
    session: Session,
    actor: Actor,
    api_url: str | None,
    parameters: dict | None = None,
    project_id: int = DEFAULT_PROJECT_ID,
) -> str:
    """``retrain.start``: an ML lead of the project starts the retrain deployment on the worker
    for it (the API, the workbench's Training runs page, ``quarkflow retrain --deployment``).
    Checked with ``users.authorize`` in the project; the flow's ``project`` parameter is the
    project's name; audited "ok" in the caller's transaction once the run exists. Returns the
    flow run id."""
    from quarkflow_core.projects import get_project
    from quarkflow_core.users import authorize, record_audit

    action = "retrain.start"
    authorize(
        session,
        actor=actor,
        allowed={Role.ML_LEAD},
        action=action,
        what="starting a retrain",
        project_id=project_id,
    )
    parameters = {
        **(parameters or {}),
        "project": get_project(session=session, ref=project_id).name,
    }
    run_id = trigger_deployment(api_url, parameters=parameters)
    record_audit(
        session=session,
        actor=actor,
        action=action,
        outcome="ok",
        target_type="flow_run",
        target_id=run_id,
        detail={"deployment": RETRAIN_DEPLOYMENT, "parameters": parameters or {}},
    )
    return run_id

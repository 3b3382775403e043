"""`quarkflow demo` (what `make demo` runs): prepare the embedded default (migrate, seed, train
and approve the first champion, the demo users), start everything the loop needs, wired to one
set of settings, and send some unseen traffic so the workbench is alive on first open.

Services, each a child of one supervisor (quarkflow_core.supervisor): a local Prefect server,
the worker serving the deployments, the API + Gradio demo, and the Streamlit workbench. One
Ctrl-C or SIGTERM stops all of them and whatever they started."""

from __future__ import annotations

import fcntl
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx

from quarkflow_core.config import Settings, child_environment
from quarkflow_core.errors import ConfigError
from quarkflow_core.orchestration import prefect_server_argv
from quarkflow_core.supervisor import Stopped, Supervisor, port_free

ROOT = Path(__file__).resolve().parents[1]
DEMO_MODEL_DIR = "artifacts/demo-smallcnn"  # under QF_DATA_DIR
DEMO_DETECTOR_DIR = "artifacts/demo-detector"  # under QF_DATA_DIR
DEPLOYMENTS = 5  # retrain, batch_predict, promote, labelstudio_sync, label_trigger
NOT_YET = (httpx.HTTPError, KeyError, ValueError)  # a service still starting


@dataclass(frozen=True)
class DemoPlan:
    host: str = "127.0.0.1"
    api_port: int = 8000
    wb_port: int = 8501
    prefect_port: int = 4200
    epochs: int = 15
    traffic: int = 300
    detection: bool = True  # also the digits-on-photos detection project
    detector_epochs: int | None = None  # None: the detector's default (CPU) recipe
    detection_images: int = 400
    start_timeout_s: float = 300.0

    @property
    def api_url(self) -> str:
        return f"http://{self.host}:{self.api_port}"

    @property
    def wb_url(self) -> str:
        return f"http://{self.host}:{self.wb_port}"

    @property
    def prefect_url(self) -> str:
        return f"http://{self.host}:{self.prefect_port}/api"


def streamlit_argv(*, host: str, port: int) -> list[str]:
    """The workbench command: product mode (no developer toolbar, no file watcher)."""
    return [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        str(ROOT / "app" / "workbench.py"),
        "--server.port",
        str(port),
        "--server.address",
        host,
        "--server.headless",
        "true",
        "--server.fileWatcherType",
        "none",
        "--browser.gatherUsageStats",
        "false",
        "--client.toolbarMode",
        "viewer",
    ]


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "app.cli", *args]


def demo_env(settings: Settings, plan: DemoPlan) -> dict[str, str]:
    """One environment for every process: the same QF_* settings, all pointed at each other."""
    env = child_environment(
        QF_PREFECT_API_URL=plan.prefect_url,
        PREFECT_API_URL=plan.prefect_url,
        QF_API_URL=plan.api_url,
        PREFECT_HOME=str((settings.data_dir / "prefect").resolve()),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        DO_NOT_TRACK="1",
        GRADIO_ANALYTICS_ENABLED="False",
        HF_HUB_OFFLINE="1",
        PYTHONUNBUFFERED="1",
        QF_PUBLIC_API_URL=settings.public_api_url or plan.api_url,
    )
    return env


def _ok(url: str) -> bool:
    return httpx.get(url, timeout=3).status_code == 200


def _deployments_ready(prefect_url: str, since: datetime) -> bool:
    """All deployments (re)applied by this run's worker: a Prefect server that kept them from
    an earlier run must not count."""
    r = httpx.post(f"{prefect_url}/deployments/filter", json={}, timeout=5)
    fresh = [d for d in r.json() if datetime.fromisoformat(d["updated"]) >= since]
    return len(fresh) >= DEPLOYMENTS


def _outbox_drained(api_url: str) -> bool:
    report = httpx.get(f"{api_url}/readyz", timeout=5).json()
    return report["ready"] and report["checks"]["outbox"]["depth"] == 0


def prepare(sup: Supervisor, settings: Settings, plan: DemoPlan, env: dict[str, str]) -> Path:
    """Migrations, seed data, the demo model (trained once), the champion, the demo users."""
    from quarkflow_core.database import get_engine, session_scope
    from quarkflow_core.demo_data import ensure_demo_users

    model = settings.data_dir / DEMO_MODEL_DIR
    sup.run("migrations", _cli("db", "upgrade"), env=env)
    sup.run("seed data", _cli("seed-demo"), env=env)
    if not (model / "manifest.json").exists():
        sup.run(
            "training",
            _cli("train", "--out", str(model), "--epochs", str(plan.epochs)),
            env=env,
        )
    if not (model / "model.onnx").exists():  # also when an earlier export was interrupted
        sup.run("export", _cli("export", str(model), "--format", "onnx"), env=env)
    sup.run("champion", _cli("demo-bootstrap", str(model)), env=env)
    with session_scope(get_engine(settings.database_url)) as s:
        ensure_demo_users(session=s)
    if plan.detection:
        prepare_detection(sup, settings, plan, env)
    return model


def prepare_detection(
    sup: Supervisor, settings: Settings, plan: DemoPlan, env: dict[str, str]
) -> Path:
    """The detection project (digits pasted on photos): created, seeded, a detector trained
    once (the GPU's recipe when CUDA is present), exported and approved as its champion."""
    from quarkflow_core.database import get_engine, session_scope
    from quarkflow_core.detection.demo import DEMO_PROJECT, ensure_demo_project

    with session_scope(get_engine(settings.database_url)) as s:
        ensure_demo_project(session=s)
    model = settings.data_dir / DEMO_DETECTOR_DIR
    project = ("--project", DEMO_PROJECT)
    sup.run(
        "detection seed data",
        _cli(*project, "seed-demo", "--limit", str(plan.detection_images)),
        env=env,
    )
    if not (model / "manifest.json").exists():
        epochs = () if plan.detector_epochs is None else ("--epochs", str(plan.detector_epochs))
        sup.run(
            "detector training",
            _cli(*project, "train-detector", "--out", str(model), *epochs),
            env=env,
        )
    if not (model / "model.onnx").exists():
        sup.run("detector export", _cli(*project, "export", str(model)), env=env)
    sup.run("detector champion", _cli(*project, "demo-bootstrap", str(model)), env=env)
    return model


def send_traffic(
    sup: Supervisor, settings: Settings, plan: DemoPlan, out: Callable[[str], None]
) -> None:
    """Unseen digits through the running API as demo-expert, with a token that expires in 15
    minutes and is revoked once the predictions are logged. Images already predicted (an
    earlier `make demo`) are not sent again."""
    from sqlalchemy.exc import SQLAlchemyError

    from quarkflow_core.database import begin_write, get_engine, session_scope
    from quarkflow_core.demo_data import DEMO_EXPERT, pending_traffic, send_demo_traffic
    from quarkflow_core.users import create_token, get_user, revoke_token

    engine = get_engine(settings.database_url)
    with session_scope(engine) as s:
        total, pngs = pending_traffic(session=s, n=plan.traffic)
    if not pngs:
        out(f"demo traffic: all {total} unseen digits were predicted before; none sent again")
        return
    with session_scope(engine) as s:
        row, token = create_token(
            session=s,
            user=get_user(session=s, username=DEMO_EXPERT),
            secret=settings.secret_key.get_secret_value(),
            name="demo traffic",
            expires_in=timedelta(minutes=15),
        )
        token_id = row.id
    try:
        flagged = send_demo_traffic(
            api_url=plan.api_url, token=token, pngs=pngs, progress=lambda *_: sup.check()
        )
        sup.wait_until(
            lambda: _outbox_drained(plan.api_url),
            timeout_s=120,
            what="the traffic to be logged",
            not_yet=NOT_YET,
        )
    except httpx.HTTPError as exc:
        raise ConfigError(f"could not send the demo traffic to {plan.api_url}: {exc}") from None
    finally:
        try:
            with session_scope(engine) as s:
                begin_write(s)
                revoke_token(session=s, token_id=token_id)
        except SQLAlchemyError as exc:  # it expires in 15 minutes anyway
            out(f"warning: could not revoke the demo-traffic token #{token_id}: {exc}")
    out(
        f"demo traffic: {len(pngs)} unseen digits predicted through the API; {flagged} were "
        "low-confidence and are in the review queue"
    )


def banner(settings: Settings, plan: DemoPlan) -> str:
    from quarkflow_core.demo_data import DEMO_LEAD_PASSWORD

    logs = settings.data_dir / "logs"
    return "\n".join(
        [
            "",
            "Quarkflow is running (embedded default: "
            f"{settings.database_backend} + {settings.storage_url}; logs in {logs}/)",
            f"  Demo, for domain experts:   {plan.api_url}/demo   (no sign-in on localhost)",
            f"  Workbench:                  {plan.wb_url}   sign in as demo-analyst or demo-lead,"
            f" password {DEMO_LEAD_PASSWORD}",
            f"  REST API:                   {plan.api_url}/docs",
            f"  Prefect (retrains, flows):  {plan.prefect_url.removesuffix('/api')}",
            "Ctrl-C stops everything.",
            "",
        ]
    )


@contextmanager
def single_demo(data_dir: Path) -> Iterator[None]:
    """One `quarkflow demo` per state folder: a second one (even while the first is still
    training, before any port is bound) is refused instead of sharing its files."""
    data_dir.mkdir(parents=True, exist_ok=True)
    with open(data_dir / "demo.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(
                f"another `make demo` is running on {data_dir}; stop it first (Ctrl-C)"
            ) from None
        yield


def run_demo(settings: Settings, plan: DemoPlan, *, out: Callable[[str], None] = print) -> int:
    """Prepare, start, wire and watch the whole product; returns the exit code."""
    with single_demo(settings.data_dir):
        for name, port in (
            ("API", plan.api_port),
            ("workbench", plan.wb_port),
            ("Prefect server", plan.prefect_port),
        ):
            if not port_free(plan.host, port):
                raise ConfigError(
                    f"port {port} ({name}) is taken: is another `make demo` running? Stop it, "
                    "or choose other ports (make demo PORT=8010 WB_PORT=8511 PREFECT_PORT=4210)"
                )
        with Supervisor() as sup:
            try:
                start(sup, settings, plan, out)
                while True:
                    sup.sleep(1.0)
                    dead = sup.failed()
                    if dead is not None:
                        out(
                            f"{dead.name} stopped unexpectedly (exit {dead.proc.returncode}); "
                            f"stopping everything. Last lines of {dead.log_path}:\n{dead.tail()}"
                        )
                        return 1
            except Stopped:
                out(f"{sup.reason or 'stop'} received: stopping every Quarkflow process ...")
                return 0
            finally:
                sup.shutdown()
                out("stopped.")


def start(sup: Supervisor, settings: Settings, plan: DemoPlan, out: Callable[[str], None]) -> None:
    """Prepare, start the four services, send the traffic, wait until all are ready."""
    env = demo_env(settings, plan)
    logs = settings.data_dir / "logs"
    timeout = plan.start_timeout_s

    def wait(predicate: Callable[[], bool], what: str) -> None:
        sup.wait_until(predicate, timeout_s=timeout, what=what, not_yet=NOT_YET)

    prepare(sup, settings, plan, env)
    out("starting the Prefect server, the API + demo and the workbench ...")
    started = datetime.now(UTC)
    sup.start(
        "prefect-server",
        prefect_server_argv(host=plan.host, port=plan.prefect_port),
        env=env,
        log_path=logs / "prefect-server.log",
    )
    sup.start(
        "api",
        _cli("serve", "--host", plan.host, "--port", str(plan.api_port)),
        env=env,
        log_path=logs / "api.log",
    )
    sup.start(
        "workbench",
        streamlit_argv(host=plan.host, port=plan.wb_port),
        env=env,
        log_path=logs / "workbench.log",
    )
    wait(lambda: _ok(plan.prefect_url + "/health"), "the Prefect server")
    sup.start("worker", _cli("worker"), env=env, log_path=logs / "worker.log")
    wait(lambda: _ok(plan.api_url + "/readyz"), "the API")
    wait(lambda: _outbox_drained(plan.api_url), "the API's outbox")
    send_traffic(sup, settings, plan, out)
    wait(lambda: _ok(plan.wb_url + "/_stcore/health"), "the workbench")
    wait(lambda: _deployments_ready(plan.prefect_url, started), "the worker's deployments")
    out(banner(settings, plan))

"""Helpers shared by the serving tests: a migrated database with users, tokens and a champion,
settings pointing at it, live servers, and a TCP proxy that can simulate an outage."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from sqlalchemy.orm import Session

from helpers.data import SEED_SIZE
from quarkflow_core import migrations, registry
from quarkflow_core.config import load_settings
from quarkflow_core.database import make_engine
from quarkflow_core.orchestration import stop_process
from quarkflow_core.schema import Role
from quarkflow_core.storage import storage_from_url
from quarkflow_core.users import create_token, create_user

SECRET = "test-secret-key"
ROLES = {
    "expert": Role.DOMAIN_EXPERT,
    "analyst": Role.ANALYST,
    "lead": Role.ML_LEAD,
    "admin": Role.ADMIN,
}


@dataclass
class Deployment:
    database_url: str
    storage_url: str
    data_dir: Path
    emulator_host: str | None
    tokens: dict[str, str] = field(default_factory=dict)

    def settings(self, **overrides):
        base = {
            "data_dir": self.data_dir,
            "database_url": self.database_url,
            "storage_url": self.storage_url,
            "storage_emulator_host": self.emulator_host,
            "secret_key": SECRET,
            "anonymous_demo": False,
            "model_poll_s": 0.2,
            "max_upload_bytes": 300_000,
            "max_image_pixels": 1_000_000,
            "max_batch_files": 8,
        }
        return load_settings(**{**base, **overrides})

    def env(self, **extra: str) -> dict[str, str]:
        env = {
            "PATH": "/usr/bin:/bin",
            "HOME": str(self.data_dir),
            "QF_DATA_DIR": str(self.data_dir),
            "QF_DATABASE_URL": self.database_url,
            "QF_STORAGE_URL": self.storage_url,
            "QF_SECRET_KEY": SECRET,
            "QF_MODEL_POLL_S": "0.2",
            "QF_GRPC_PORT": "0",  # a server that needs gRPC picks a free port
            "GRADIO_ANALYTICS_ENABLED": "False",
            "HF_HUB_OFFLINE": "1",
            "DO_NOT_TRACK": "1",
        }
        if self.emulator_host:
            env["STORAGE_EMULATOR_HOST"] = self.emulator_host
        return {**env, **extra}

    def auth(self, who: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[who]}"}

    def engine(self):
        return make_engine(self.database_url)

    def storage(self):
        return storage_from_url(self.storage_url, emulator_host=self.emulator_host)


def deploy(
    database_url: str,
    storage_url: str,
    data_dir: Path,
    champion: Path | None,
    emulator_host=None,
) -> Deployment:
    """Migrate, create one user + token per role, register ``champion`` and approve it
    (``None``: users and tokens only)."""
    migrations.upgrade(database_url)
    dep = Deployment(database_url, storage_url, data_dir, emulator_host)
    engine = dep.engine()
    storage = dep.storage()
    try:
        with Session(engine, expire_on_commit=False) as s:
            users = {}
            for name, role in ROLES.items():
                users[name] = create_user(session=s, username=name, role=role)
                _, dep.tokens[name] = create_token(session=s, user=users[name], secret=SECRET)
            s.commit()
            if champion is None:
                return dep
            row = registry.register_version(
                session=s, storage=storage, artifact_dir=champion, created_by="test"
            )
            registry.approve(
                session=s,
                storage=storage,
                version=row,
                user=users["lead"],
                reason="first champion",
                cache_root=data_dir / "lead-cache",
            )
    finally:
        engine.dispose()
    return dep


def local_deploy(root: Path, champion: Path | None) -> Deployment:
    """deploy() on the embedded default under ``root``: SQLite + a local folder."""
    return deploy(f"sqlite:///{root}/qf.db", f"file://{root}/store", root / "qf", champion)


def seed_and_register(dep: Deployment, artifact: Path, *, as_challenger: bool = True):
    """Seed the SEED_SIZE demo digits (the hold-out a comparison needs) and register ``artifact``
    (as the challenger by default); returns its version row."""
    from quarkflow_core.demo_data import seed_demo

    engine = dep.engine()
    try:
        with Session(engine, expire_on_commit=False) as s:
            seed_demo(session=s, storage=dep.storage(), limit=SEED_SIZE)
            s.commit()
            return registry.register_version(
                session=s,
                storage=dep.storage(),
                artifact_dir=artifact,
                created_by="t",
                as_challenger=as_challenger,
            )
    finally:
        engine.dispose()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(predicate, *, timeout: float = 30.0, every: float = 0.1, what: str = "condition"):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
            if last:
                return last
        except Exception as exc:  # the thing we wait for may still be starting
            last = exc
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


class ServerProcess:
    """`quarkflow serve` as a real process (so it can be killed with -9)."""

    def __init__(self, env: dict[str, str], port: int, log: Path) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log = log
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "serve", "--port", str(port)],
            env=env,
            stdout=open(log, "ab"),  # noqa: SIM115 - closed with the process
            stderr=subprocess.STDOUT,
        )

    def wait_live(self, timeout: float = 90.0) -> None:
        def live() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited: {self.log.read_text()[-3000:]}")
            return httpx.get(self.url + "/healthz", timeout=2).status_code == 200

        wait_until(live, timeout=timeout, what="the server to start")

    def kill9(self) -> None:
        self.proc.kill()  # SIGKILL: no shutdown hooks, no final flush
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        stop_process(self.proc, timeout_s=15)


class ThreadedServer:
    """uvicorn in a thread, for tests that need a live HTTP port in-process."""

    def __init__(self, app, port: int | None = None) -> None:
        import uvicorn

        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ThreadedServer:
        self.thread.start()
        wait_until(
            lambda: httpx.get(self.url + "/healthz", timeout=2).status_code == 200,
            timeout=60,
            what="uvicorn",
        )
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


class TcpProxy:
    """Forwards a local port to a real service; ``down()`` refuses new connections and cuts
    the open ones (a real network outage for the client), ``up()`` restores it."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = free_port()
        self._listener: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self.up()

    def up(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def down(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        with self._lock:
            for conn in self._conns:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
                conn.close()
            self._conns.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)


def run_cli(dep: Deployment, monkeypatch, *args: str):
    """``quarkflow ARGS`` in-process (typer's CliRunner) against ``dep``: its QF_* settings in
    the environment, the settings cache cleared. Returns the click Result."""
    from typer.testing import CliRunner

    from app import cli
    from quarkflow_core.config import get_settings

    for key, value in dep.env().items():
        if key.startswith("QF_"):
            monkeypatch.setenv(key, value)
    get_settings.cache_clear()
    return CliRunner().invoke(cli.app, list(args))

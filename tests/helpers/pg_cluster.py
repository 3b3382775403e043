"""A private, throw-away Postgres cluster that a test may stop and start for real (the shared
test server must not be stopped: other tests use it).

``initdb`` into a fresh temp folder owned by the ``postgres`` OS user when we run as root (the
server refuses to run as root), trust authentication, listening only on 127.0.0.1 on a free
port, Unix sockets inside the cluster's own folder."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import text

from helpers.serving import free_port, wait_until
from quarkflow_core.database import make_engine


def postgres_bin_dir() -> Path:
    """QF_TEST_PG_BIN, else the newest /usr/lib/postgresql/<major>/bin, else initdb on PATH."""
    if os.environ.get("QF_TEST_PG_BIN"):
        return Path(os.environ["QF_TEST_PG_BIN"])

    def major(initdb: str) -> int:
        name = Path(initdb).parent.parent.name
        return int(name) if name.isdigit() else 0

    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=major)
    if found:
        return Path(found[-1]).parent
    which = shutil.which("initdb")
    if which:
        return Path(which).parent
    raise RuntimeError(
        "no Postgres server binaries (initdb, pg_ctl) found: install postgresql or set "
        "QF_TEST_PG_BIN to their folder"
    )


class PgCluster:
    """One cluster in ``root``; ``start()`` / ``stop(mode)`` are the real pg_ctl commands."""

    def __init__(self, root: Path, port: int, bin_dir: Path) -> None:
        self.root = root
        self.data = root / "data"
        self.log = root / "postgres.log"
        self.port = port
        self.bin = bin_dir
        self._as_postgres = os.geteuid() == 0

    def _run(self, *args: str, timeout: float = 120, check: bool = True):
        cmd = [str(self.bin / args[0]), *args[1:]]
        if self._as_postgres:
            runuser = shutil.which("runuser") or "/usr/sbin/runuser"  # PATH may lack sbin
            cmd = [runuser, "-u", "postgres", "--", *cmd]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if check and out.returncode != 0:
            raise RuntimeError(
                f"{' '.join(cmd)} failed ({out.returncode}): {out.stdout[-2000:]}"
                f"{out.stderr[-2000:]}\n--- server log ---\n{self.log_tail()}"
            )
        return out

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    def init(self) -> None:
        self._run(
            "initdb",
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",
        )
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.write(
                "\n# quarkflow drill cluster\n"
                f"port = {self.port}\n"
                "listen_addresses = '127.0.0.1'\n"
                f"unix_socket_directories = '{self.root}'\n"
                "max_connections = 50\n"
                "shared_buffers = 32MB\n"
                "fsync = off\n"  # a drill stops the server cleanly; nothing here needs fsync
                "full_page_writes = off\n"
            )

    def start(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "90", "start")

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "90", "stop")

    def running(self) -> bool:
        return self._run("pg_ctl", "-D", str(self.data), "status", check=False).returncode == 0

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        admin = make_engine(self.url(), isolation_level="AUTOCOMMIT")
        try:
            wait_until(lambda: admin.connect().close() is None, timeout=30, what="the cluster")
            with admin.connect() as conn:
                conn.execute(text(f'CREATE DATABASE "{name}"'))
        finally:
            admin.dispose()
        return self.url(name)


@contextmanager
def private_cluster() -> Iterator[PgCluster]:
    """A started cluster, stopped (immediate) and deleted afterwards whatever happened."""
    bin_dir = postgres_bin_dir()
    root = Path(tempfile.mkdtemp(prefix="qf-drill-pg-"))
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
    cluster = PgCluster(root, free_port(), bin_dir)
    try:
        cluster.init()
        cluster.start()
        yield cluster
    finally:
        if (cluster.data / "postmaster.pid").exists():
            cluster._run("pg_ctl", "-D", str(cluster.data), "-m", "immediate", "stop", check=False)
        shutil.rmtree(root, ignore_errors=True)

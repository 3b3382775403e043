"""The supervisor behind `make demo`: one Ctrl-C (SIGINT to the terminal's process group),
a SIGTERM to it, or the death of whatever started it (``make``), stops every process it
started, grandchildren in their own sessions included (as Prefect starts flow runs), and
frees their ports. Real processes, real signals."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
from helpers.serving import free_port, wait_until

from quarkflow_core.supervisor import port_free

pytestmark = pytest.mark.integration

# A service that holds a port and starts a grandchild in a new session that holds another port
# and would outlive its parent (what Prefect's runner does with flow runs).
SERVICE = textwrap.dedent(
    """
    import os, socket, subprocess, sys, time
    port, grand_port, orphan_port, pidfile = (*map(int, sys.argv[1:4]), sys.argv[4])
    s = socket.socket(); s.bind(("127.0.0.1", port)); s.listen()
    hold = ("import socket,time,sys; s=socket.socket(); s.bind(('127.0.0.1', int(sys.argv[1])));"
            "s.listen(); time.sleep(600)")
    # a grandchild in its own session (what Prefect's runner does with flow runs)
    g = subprocess.Popen([sys.executable, "-c", hold, str(grand_port)], start_new_session=True)
    # an orphan: started through a parent that exits at once (a daemon's double fork); it
    # is re-parented to the nearest subreaper, the supervisor, or else to init
    daemon = ("import subprocess as sp, sys; p = sp.Popen([sys.executable, '-c', sys.argv[1],"
              " sys.argv[2]], start_new_session=True, stdout=sp.DEVNULL, stderr=sp.DEVNULL);"
              " print(p.pid)")
    orphan = subprocess.run([sys.executable, "-c", daemon, hold, str(orphan_port)],
                            capture_output=True, text=True, check=True).stdout.strip()
    open(pidfile, "w").write(f"{g.pid} {orphan}")
    time.sleep(600)
    """
)
# A stubborn service that ignores SIGTERM: the supervisor must SIGKILL it after the grace.
STUBBORN = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"

SUPERVISOR = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    from quarkflow_core.supervisor import Supervisor, Stopped
    service, stubborn, out, grace = sys.argv[1], sys.argv[2], Path(sys.argv[4]), float(sys.argv[5])
    ports = json.loads(sys.argv[3])
    with Supervisor(grace_s=grace) as sup:
        try:
            a = sup.start("a", [sys.executable, "-c", service, *map(str, ports),
                                str(out / "grandchild.pid")], log_path=out / "a.log")
            b = sup.start("b", [sys.executable, "-c", stubborn], log_path=out / "b.log")
            (out / "children.json").write_text(json.dumps([a.proc.pid, b.proc.pid]))
            while True:
                sup.sleep(0.2)
        except Stopped:
            (out / "stopped").write_text(sup.reason or "")
    """
)


@pytest.fixture(autouse=True)
def no_strays(tmp_path):
    """Whatever a failing test leaves (found by its pid files) is killed."""
    yield
    pids = []
    for name in ("children.json", "grandchild.pid"):
        f = tmp_path / name
        if f.exists():
            pids += [int(p) for p in f.read_text().strip("[]\n").replace(",", " ").split()]
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            psutil.Process(pid).kill()


def _port_taken(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _start(tmp_path: Path, *, via_parent: bool, grace_s: float = 3):
    ports = [free_port(), free_port(), free_port()]
    argv = [
        sys.executable,
        "-c",
        SUPERVISOR,
        SERVICE,
        STUBBORN,
        json.dumps(ports),
        str(tmp_path),
        str(grace_s),
    ]
    if via_parent:  # a parent that is not us, like `make`: a shell that waits on it
        argv = ["bash", "-c", shlex.join(argv) + "; true"]
    proc = subprocess.Popen(argv, start_new_session=True, cwd=Path(__file__).parents[1])
    wait_until(
        lambda: (tmp_path / "grandchild.pid").exists() and all(_port_taken(p) for p in ports),
        timeout=60,
        what="the supervised services",
    )
    pids = [*json.loads((tmp_path / "children.json").read_text())]
    pids += [int(p) for p in (tmp_path / "grandchild.pid").read_text().split()]
    supervisor = proc.pid
    if via_parent:
        (supervisor,) = [c.pid for c in psutil.Process(proc.pid).children() if "python" in c.name()]
    assert psutil.Process(pids[-1]).ppid() == supervisor  # the orphan came to its subreaper
    assert all(psutil.pid_exists(p) for p in pids)
    return proc, [*pids, supervisor], ports


def _assert_all_gone(pids: list[int], ports: list[int]) -> None:
    def gone() -> bool:
        alive = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"]
        return not alive

    wait_until(gone, timeout=30, what="every supervised process to exit")
    assert all(port_free("127.0.0.1", p) for p in ports)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_one_signal_stops_every_process_and_frees_ports(tmp_path, sig):
    proc, pids, ports = _start(tmp_path, via_parent=False)
    if sig == signal.SIGINT:  # Ctrl-C: the terminal signals the whole foreground group
        os.killpg(proc.pid, sig)
    else:  # a supervisor or a second terminal: `kill PID`
        proc.send_signal(sig)
    assert proc.wait(timeout=60) == 0
    assert (tmp_path / "stopped").read_text() == sig.name
    _assert_all_gone(pids, ports)


def test_parent_dying_stops_everything(tmp_path):
    """SIGTERM to `make` (the launcher's parent) must not leave the launcher and its services."""
    parent, pids, ports = _start(tmp_path, via_parent=True)
    parent.kill()  # the parent goes away without forwarding anything
    parent.wait(timeout=10)
    _assert_all_gone(pids, ports)


def test_a_second_ctrl_c_kills_at_once(tmp_path):
    """A service that ignores SIGTERM would hold everything for the grace period (here 120 s):
    a second Ctrl-C must not wait for it."""
    proc, pids, ports = _start(tmp_path, via_parent=False, grace_s=120)
    os.killpg(proc.pid, signal.SIGINT)
    time.sleep(1)
    assert proc.poll() is None  # still waiting on the stubborn one
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=60) == 0
    _assert_all_gone(pids, ports)

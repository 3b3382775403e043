"""The process chores `quarkflow worker`, the tests and the benchmarks share: waiting for an
HTTP service and stopping a child process, on real processes."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from helpers.serving import free_port

from quarkflow_core.orchestration import stop_process, wait_for_http

pytestmark = pytest.mark.unit


def test_wait_for_http_sees_a_server_come_up(tmp_path):
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert wait_for_http(f"http://127.0.0.1:{port}/", timeout_s=30, proc=server, every_s=0.1)
    finally:
        stop_process(server, timeout_s=10)
    assert server.returncode is not None


def test_wait_for_http_gives_up_at_once_when_the_process_exits():
    dead = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    dead.wait()
    started = time.monotonic()
    assert not wait_for_http(f"http://127.0.0.1:{free_port()}/", timeout_s=60, proc=dead)
    assert time.monotonic() - started < 5


def test_wait_for_http_times_out_when_nothing_answers():
    started = time.monotonic()
    assert not wait_for_http(f"http://127.0.0.1:{free_port()}/", timeout_s=1, every_s=0.1)
    assert 1 <= time.monotonic() - started < 10


def test_stop_process_kills_what_ignores_sigterm():
    stubborn = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "print('ready', flush=True); time.sleep(120)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert stubborn.stdout.readline().strip() == "ready"
    stop_process(stubborn, timeout_s=1)
    assert stubborn.returncode == -9  # SIGKILL after the grace period
    stop_process(stubborn, timeout_s=1)  # already gone: nothing to do

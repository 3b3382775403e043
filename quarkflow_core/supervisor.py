"""A small process supervisor for `quarkflow demo`: start several services, stop all of them,
and everything they started, on one Ctrl-C or SIGTERM, with no orphan left holding a port.

How nothing is left behind (Linux):
- the supervisor is a *child subreaper*: a process whose parent dies (a Prefect flow run whose
  runner stopped, say) is re-parented to the supervisor instead of init, so it stays in its tree;
- each child runs in its own session, so a terminal's Ctrl-C reaches the supervisor alone and
  the shutdown happens in order, once;
- each child gets SIGTERM if the supervisor dies (parent-death signal), and so does the supervisor
  if whatever started it (``make``) dies;
- shutdown sends SIGTERM to every descendant, waits, then SIGKILLs what is left, and checks again
  for late re-parented ones.
Elsewhere the same code runs without those kernel features (best effort)."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import psutil

from quarkflow_core.errors import ConfigError

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36


def _prctl(option: int, value: int) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(option, value, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _child_setup() -> None:  # runs in the child between fork and exec
    os.setsid()
    _prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


@dataclass
class Child:
    name: str
    proc: subprocess.Popen
    log_path: Path | None
    log_file: IO[bytes] | None = field(default=None, repr=False)

    def tail(self, lines: int = 20) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


class Stopped(Exception):  # a control-flow signal, not an error
    """Raised inside the supervised block when a stop signal arrived."""


class Supervisor:
    """Use as a context manager on the main thread; ``stop_requested`` turns true on SIGINT,
    SIGTERM or SIGHUP, and leaving the block stops every process started."""

    def __init__(self, *, grace_s: float = 10.0) -> None:
        self.grace_s = grace_s
        self.children: list[Child] = []
        self._stop = threading.Event()
        self._old: dict[int, object] = {}
        self.reason: str | None = None

    # -- lifecycle
    def __enter__(self) -> Supervisor:
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("the supervisor must run on the main thread")
        _prctl(PR_SET_CHILD_SUBREAPER, 1)
        _prctl(PR_SET_PDEATHSIG, signal.SIGTERM)  # `make` (or a shell) dying stops us too
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            self._old[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *exc) -> bool:
        self.shutdown()
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        return exc[0] is Stopped

    def _on_signal(self, signum: int, _frame) -> None:
        if self._stop.is_set():  # a second Ctrl-C: no more waiting, kill everything now
            self._kill_all()
            return
        self.reason = signal.Signals(signum).name
        self._stop.set()

    @staticmethod
    def _kill_all() -> None:
        for p in psutil.Process().children(recursive=True):
            with contextlib.suppress(psutil.Error):
                p.kill()

    @property
    def stop_requested(self) -> bool:
        return self._stop.is_set()

    def check(self) -> None:
        """Raise Stopped if a signal asked us to stop."""
        if self._stop.is_set():
            raise Stopped(self.reason)

    def sleep(self, seconds: float) -> None:
        if self._stop.wait(seconds):
            raise Stopped(self.reason)

    # -- children
    def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: dict[str, str] | None = None,
        log_path: Path | None = None,
    ) -> Child:
        """Start a long-running service; its output goes to ``log_path`` (or ours if None)."""
        self.check()
        log_file = None
        if log_path is not None:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            log_file = open(log_path, "ab")  # noqa: SIM115 - closed at shutdown
        proc = subprocess.Popen(  # noqa: S603 - our own commands
            list(argv),
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT if log_file else None,
            preexec_fn=_child_setup,  # started from the main thread only
        )
        child = Child(name, proc, log_path, log_file)
        self.children.append(child)
        return child

    def run(self, name: str, argv: Sequence[str], *, env: dict[str, str] | None = None) -> None:
        """Run a step to completion with our terminal output (progress bars); stoppable."""
        child = self.start(name, argv, env=env)
        while child.proc.poll() is None:
            if self._stop.wait(0.2):
                raise Stopped(self.reason)
        self.children.remove(child)
        if child.proc.returncode != 0:
            raise ConfigError(f"{name} failed (exit {child.proc.returncode}); see the output above")

    def failed(self) -> Child | None:
        """A service that exited on its own (none should while we run)."""
        for child in self.children:
            if child.proc.poll() is not None:
                return child
        return None

    def wait_until(
        self,
        predicate: Callable[[], bool],
        *,
        timeout_s: float,
        what: str,
        every_s: float = 0.5,
        not_yet: tuple[type[BaseException], ...] = (OSError,),
    ) -> None:
        """Poll ``predicate`` until true; the ``not_yet`` errors it raises mean "still
        starting". Stops early (ConfigError) when a service exits, or on a stop signal."""
        deadline = time.monotonic() + timeout_s
        while True:
            self.check()
            dead = self.failed()
            if dead is not None:
                raise ConfigError(
                    f"{dead.name} exited ({dead.proc.returncode}) while waiting for {what}; "
                    f"last lines of {dead.log_path}:\n{dead.tail()}"
                )
            with contextlib.suppress(*not_yet):
                if predicate():
                    return
            if time.monotonic() > deadline:
                raise ConfigError(f"timed out after {timeout_s:.0f} s waiting for {what}")
            self.sleep(every_s)

    # -- stopping
    def shutdown(self) -> None:
        """Stop the last-started service first (the worker, while the Prefect server it talks
        to is still up), then all the others at once, each with everything it started:
        SIGTERM, up to ``grace_s``, then SIGKILL. Then sweep up whatever is left or was
        re-parented to us meanwhile. A second signal meanwhile kills everything at once.
        Idempotent."""
        stages = [self.children[-1:], self.children[:-1]]
        for stage in stages:
            tree: list[psutil.Process] = []
            for child in stage:
                with contextlib.suppress(psutil.Error):
                    top = psutil.Process(child.proc.pid)
                    tree += [top, *top.children(recursive=True)]
            if tree:
                self._terminate(tree, self.grace_s)
        me = psutil.Process()
        for _ in range(3):
            procs = [*me.children(recursive=True)]
            if not procs:
                break
            self._terminate(procs, 5)
        for child in self.children:
            if child.log_file:
                child.log_file.close()
        self.children.clear()

    def _terminate(self, procs: list[psutil.Process], grace_s: float) -> None:
        for p in procs:
            with contextlib.suppress(psutil.Error):
                p.terminate()
        _, alive = psutil.wait_procs(procs, timeout=grace_s)
        for p in alive:
            with contextlib.suppress(psutil.Error):
                p.kill()
        psutil.wait_procs(alive, timeout=5)
        self._reap()

    @staticmethod
    def _reap() -> None:
        """Collect exit statuses of re-parented grandchildren (we are their subreaper)."""
        while True:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return

"""The background thread that drains the outbox into the database and object storage, telling
outages (retry everything, with backoff) from record faults (that record alone, then the dead
letters)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from quarkflow_core.outbox.store import Outbox, Record

log = logging.getLogger("quarkflow.outbox")


class Flusher:
    """Drains the outbox with ``apply(records)`` (one database transaction per call, up to
    ``batch`` records; after a part batch it waits ``linger_s`` for more to gather) and deletes
    what was applied in one outbox transaction.

    ``is_transient(exc)`` tells an outage (True: keep every record, retry the batch after a
    capped exponential backoff, for as long as it takes) from a record fault (False: that record
    alone waits ``2**attempts`` seconds, up to ``max_record_pause_s``, and after
    ``max_attempts`` goes to the dead letters)."""

    def __init__(
        self,
        outbox: Outbox,
        apply: Callable[[list[Record]], None],
        *,
        is_transient: Callable[[BaseException], bool],
        batch: int = 200,
        idle_s: float = 0.2,
        linger_s: float = 0.1,
        max_backoff_s: float = 10.0,
        max_attempts: int = 8,
        max_record_pause_s: float = 300.0,
    ) -> None:
        self.outbox = outbox
        self.apply = apply
        self.is_transient = is_transient
        self.batch = batch
        self.idle_s = idle_s
        self.linger_s = linger_s
        self.max_backoff_s = max_backoff_s
        self.max_attempts = max_attempts
        self.max_record_pause_s = max_record_pause_s
        self.last_error: str | None = None
        self.failing_since: float | None = None  # wall time the current outage began
        self.retries = 0  # batch retries in the current outage
        self.flushed = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="qf-flusher", daemon=True)
            self._thread.start()

    def stop(self, *, drain_s: float = 5.0) -> None:
        """Stop after trying to drain for up to ``drain_s`` (what is left stays in the file)."""
        deadline = time.monotonic() + drain_s
        while self._thread and self.outbox.depth() and time.monotonic() < deadline:
            if self.last_error:
                break
            time.sleep(0.05)
        self._stop.set()
        self.outbox.wakeup.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def status(self) -> dict[str, Any]:
        """The backlog plus the current outage, if any (for /readyz and the CLI)."""
        return {
            **self.outbox.backlog(),
            "flushed": self.flushed,
            "outage": self.last_error is not None,
            "last_error": self.last_error,
            "failing_for_s": None
            if self.failing_since is None
            else round(time.time() - self.failing_since, 1),
            "retries": self.retries,
        }

    def flush_once(self) -> int:
        """Move one batch; returns how many records left the outbox. Raises on outages."""
        records = self.outbox.peek(self.batch)
        if not records:
            return 0
        try:
            self.apply(records)
        except BaseException as exc:
            if self.is_transient(exc):
                raise
            # A record fault somewhere in the batch: apply one by one, keep the good ones flowing.
            done = 0
            for record in records:
                try:
                    self.apply([record])
                except BaseException as one:
                    if self.is_transient(one):
                        raise
                    pause = min(self.max_record_pause_s, 2.0**record.attempts)
                    moved = self.outbox.failed(
                        record, repr(one), max_attempts=self.max_attempts, retry_in_s=pause
                    )
                    log.error(
                        "outbox record %s (%s %s) refused: %r; %s",
                        record.id,
                        record.kind,
                        record.key,
                        one,
                        "moved to dead_letter (see `quarkflow outbox list`)"
                        if moved
                        else f"try {record.attempts + 2} in {pause:.0f}s",
                    )
                    continue
                self.outbox.remove([record.id])
                done += 1
            self.flushed += done
            return done
        self.outbox.remove([r.id for r in records])
        self.flushed += len(records)
        return len(records)

    def _run(self) -> None:
        backoff = 0.0
        while not self._stop.is_set():
            try:
                n = self.flush_once()
                if self.last_error is not None:
                    log.warning(
                        "outbox flushing again after %.0fs of failures",
                        time.time() - (self.failing_since or time.time()),
                    )
                self.last_error, self.failing_since, self.retries = None, None, 0
                backoff = 0.0
                if n == 0:
                    self.outbox.wakeup.wait(self.idle_s)
                    self.outbox.wakeup.clear()
                elif n < self.batch and self.linger_s > 0:
                    # a part batch: let more records gather, so that a busy server flushes
                    # them in few large transactions instead of many small ones (they are
                    # already durable in the outbox; only their arrival in the database waits)
                    self._stop.wait(self.linger_s)
            except BaseException as exc:  # an outage: keep the records, retry
                self.last_error = f"{type(exc).__name__}: {exc}"[:500]
                if self.failing_since is None:
                    self.failing_since = time.time()
                self.retries += 1
                backoff = min(self.max_backoff_s, max(0.25, backoff * 2))
                log.warning("outbox flush failed (%s); retrying in %.1fs", self.last_error, backoff)
                self._stop.wait(backoff)

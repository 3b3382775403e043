"""The local durable outbox: what the service has acknowledged but not yet written to the
database and object storage.

An SQLite file in ``QF_DATA_DIR`` (WAL). A record is committed here *before* the request is
answered; a committed WAL transaction survives the process being killed (-9) at any moment.
A background ``Flusher`` moves records to Postgres/SQLite + storage, deletes them only after
that transaction has committed (the writers are idempotent, so a crash between the two only
replays), and backs off while a dependency is down. A record that keeps failing for a reason
other than an outage is moved to a dead-letter table, never dropped.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("quarkflow.outbox")

SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    key TEXT NOT NULL,
    payload TEXT NOT NULL,
    blob BLOB,
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS ix_outbox_key ON outbox (key);
CREATE TABLE IF NOT EXISTS dead_letter (
    id INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,
    key TEXT NOT NULL,
    payload TEXT NOT NULL,
    blob BLOB,
    error TEXT,
    created_at REAL NOT NULL,
    failed_at REAL NOT NULL
);
"""


@dataclass
class Record:
    id: int
    kind: str
    key: str
    payload: dict[str, Any]
    blob: bytes | None
    attempts: int


class Outbox:
    def __init__(self, path: str | Path, *, synchronous: str = "NORMAL") -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(
            self.path, isolation_level=None, check_same_thread=False, timeout=30
        )
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute(f"PRAGMA synchronous={synchronous}")
        self._conn.executescript(SCHEMA)
        self.wakeup = threading.Event()

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def append(
        self, kind: str, key: str, payload: dict[str, Any], blob: bytes | None = None
    ) -> int:
        """Durably record; returns once committed."""
        with self._lock:
            cur = self._conn.execute(
                "INSERT INTO outbox (kind, key, payload, blob, created_at) VALUES (?, ?, ?, ?, ?)",
                (kind, key, json.dumps(payload), blob, time.time()),
            )
        self.wakeup.set()
        return int(cur.lastrowid)

    def peek(self, limit: int = 200) -> list[Record]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT id, kind, key, payload, blob, attempts FROM outbox ORDER BY id LIMIT ?",
                (limit,),
            ).fetchall()
        return [Record(r[0], r[1], r[2], json.loads(r[3]), r[4], r[5]) for r in rows]

    def remove(self, ids: list[int]) -> None:
        if not ids:
            return
        with self._lock:
            self._conn.executemany("DELETE FROM outbox WHERE id = ?", [(i,) for i in ids])

    def failed(self, record: Record, error: str, *, max_attempts: int) -> bool:
        """Count a failed attempt; after ``max_attempts`` move the record to the dead letters.
        Returns True when it was moved."""
        with self._lock:
            if record.attempts + 1 >= max_attempts:
                self._conn.execute("BEGIN IMMEDIATE")
                self._conn.execute(
                    "INSERT OR REPLACE INTO dead_letter "
                    "(id, kind, key, payload, blob, error, created_at, failed_at) "
                    "SELECT id, kind, key, payload, blob, ?, created_at, ? FROM outbox "
                    "WHERE id = ?",
                    (error[:2000], time.time(), record.id),
                )
                self._conn.execute("DELETE FROM outbox WHERE id = ?", (record.id,))
                self._conn.execute("COMMIT")
                return True
            self._conn.execute(
                "UPDATE outbox SET attempts = attempts + 1, last_error = ? WHERE id = ?",
                (error[:2000], record.id),
            )
            return False

    def find(self, key: str, kind: str | None = None) -> Record | None:
        query = "SELECT id, kind, key, payload, blob, attempts FROM outbox WHERE key = ?"
        args: tuple = (key,)
        if kind:
            query += " AND kind = ?"
            args = (key, kind)
        with self._lock:
            row = self._conn.execute(query + " ORDER BY id LIMIT 1", args).fetchone()
        return (
            None
            if row is None
            else Record(row[0], row[1], row[2], json.loads(row[3]), row[4], row[5])
        )

    def depth(self) -> int:
        with self._lock:
            return int(self._conn.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])

    def dead_letters(self) -> int:
        with self._lock:
            return int(self._conn.execute("SELECT COUNT(*) FROM dead_letter").fetchone()[0])


class Flusher:
    """Drains the outbox with ``apply(records)`` (one database transaction per call)."""

    def __init__(
        self,
        outbox: Outbox,
        apply: Callable[[list[Record]], None],
        *,
        is_transient: Callable[[BaseException], bool],
        batch: int = 200,
        idle_s: float = 0.2,
        max_backoff_s: float = 10.0,
        max_attempts: int = 5,
    ) -> None:
        self.outbox = outbox
        self.apply = apply
        self.is_transient = is_transient
        self.batch = batch
        self.idle_s = idle_s
        self.max_backoff_s = max_backoff_s
        self.max_attempts = max_attempts
        self.last_error: str | None = None
        self.flushed = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
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
            # A data problem in some record: apply one by one, keep the good ones flowing.
            done = 0
            for record in records:
                try:
                    self.apply([record])
                except BaseException as one:
                    if self.is_transient(one):
                        raise
                    moved = self.outbox.failed(record, repr(one), max_attempts=self.max_attempts)
                    log.error(
                        "outbox record %s (%s) failed: %r%s",
                        record.id,
                        record.kind,
                        one,
                        "; moved to dead_letter" if moved else "",
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
                self.last_error = None
                backoff = 0.0
                if n == 0:
                    self.outbox.wakeup.wait(self.idle_s)
                    self.outbox.wakeup.clear()
            except BaseException as exc:  # an outage: keep the records, retry
                self.last_error = f"{type(exc).__name__}: {exc}"[:500]
                backoff = min(self.max_backoff_s, max(0.25, backoff * 2))
                log.warning("outbox flush failed (%s); retrying in %.1fs", self.last_error, backoff)
                self._stop.wait(backoff)

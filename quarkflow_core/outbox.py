"""The local durable outbox: what the service has acknowledged but not yet written to the
database and object storage.

An SQLite file in ``QF_DATA_DIR`` (WAL). A record is committed here *before* the request is
answered; a committed WAL transaction survives the process being killed (-9) at any moment.
A background ``Flusher`` moves records to Postgres/SQLite + storage and deletes them only after
that transaction has committed (the writers are idempotent, so a crash between the two only
replays).

Faults are of two kinds. An *outage* (database or storage unreachable, a missing bucket, a
permission problem, anything not known to be the record's fault) keeps every record and is
retried with capped exponential backoff for as long as it takes. A *record fault* (a record the
database refuses: malformed, or naming a prediction that does not exist) is retried on its own,
with growing pauses, and after ``max_attempts`` moved to the ``dead_letter`` table, never
dropped: ``quarkflow outbox list|replay|discard`` reads it back, and ``/metrics``, ``/readyz``
and the workbench count it. A discarded record is kept in ``discarded`` with who and why.
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

from sqlalchemy.orm import Session

from quarkflow_core.database import begin_write
from quarkflow_core.errors import InvalidInput, NotFound
from quarkflow_core.schema import Role, User
from quarkflow_core.users import record_audit, require_role

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
CREATE TABLE IF NOT EXISTS discarded (
    id INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,
    key TEXT NOT NULL,
    payload TEXT NOT NULL,
    error TEXT,
    reason TEXT NOT NULL,
    actor TEXT,
    created_at REAL NOT NULL,
    discarded_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS known_predictions (
    id TEXT PRIMARY KEY,
    label TEXT NOT NULL,
    created_at REAL NOT NULL
) WITHOUT ROWID;
"""
# Columns added after the first release; an older file gets them on open.
_ADDED = {"outbox": {"not_before": "REAL"}, "dead_letter": {"attempts": "INTEGER"}}


@dataclass
class Record:
    id: int
    kind: str
    key: str
    payload: dict[str, Any]
    blob: bytes | None
    attempts: int


@dataclass
class DeadLetter:
    id: int
    kind: str
    key: str
    error: str | None
    attempts: int | None
    created_at: float
    failed_at: float
    payload: dict[str, Any]


def outbox_path(data_dir: str | Path) -> Path:
    """Where the API keeps its outbox under QF_DATA_DIR."""
    return Path(data_dir) / "serving" / "outbox.db"


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
        for table, columns in _ADDED.items():
            have = {row[1] for row in self._conn.execute(f"PRAGMA table_info({table})")}
            for name, sql_type in columns.items():
                if name not in have:
                    self._conn.execute(f"ALTER TABLE {table} ADD COLUMN {name} {sql_type}")
        self.wakeup = threading.Event()

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def append(
        self, kind: str, key: str, payload: dict[str, Any], blob: bytes | None = None
    ) -> int:
        """Durably record; returns once committed. A prediction's id and label are also kept
        in ``known_predictions``, so feedback on it can be checked while the database is down."""
        now = time.time()
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                cur = self._conn.execute(
                    "INSERT INTO outbox (kind, key, payload, blob, created_at) "
                    "VALUES (?, ?, ?, ?, ?)",
                    (kind, key, json.dumps(payload), blob, now),
                )
                if kind == "prediction" and "label" in payload:
                    self._conn.execute(
                        "INSERT OR IGNORE INTO known_predictions (id, label, created_at) "
                        "VALUES (?, ?, ?)",
                        (key, str(payload["label"]), now),
                    )
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
        self.wakeup.set()
        return int(cur.lastrowid)

    def known_label(self, prediction_id: str) -> str | None:
        """The label of a prediction this outbox acknowledged (at any time), else None."""
        with self._lock:
            row = self._conn.execute(
                "SELECT label FROM known_predictions WHERE id = ?", (prediction_id,)
            ).fetchone()
        return None if row is None else row[0]

    def peek(self, limit: int = 200) -> list[Record]:
        """The oldest records that are due (a record fault's pause has passed)."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT id, kind, key, payload, blob, attempts FROM outbox "
                "WHERE COALESCE(not_before, 0) <= ? ORDER BY id LIMIT ?",
                (time.time(), limit),
            ).fetchall()
        return [Record(r[0], r[1], r[2], json.loads(r[3]), r[4], r[5]) for r in rows]

    def remove(self, ids: list[int]) -> None:
        if not ids:
            return
        with self._lock:
            self._conn.executemany("DELETE FROM outbox WHERE id = ?", [(i,) for i in ids])

    def failed(
        self, record: Record, error: str, *, max_attempts: int, retry_in_s: float = 0.0
    ) -> bool:
        """Count a record fault; the record waits ``retry_in_s`` before its next try, and after
        ``max_attempts`` it moves to the dead letters. Returns True when it was moved."""
        with self._lock:
            if record.attempts + 1 >= max_attempts:
                self._conn.execute("BEGIN IMMEDIATE")
                self._conn.execute(
                    "INSERT OR REPLACE INTO dead_letter "
                    "(id, kind, key, payload, blob, error, attempts, created_at, failed_at) "
                    "SELECT id, kind, key, payload, blob, ?, attempts + 1, created_at, ? "
                    "FROM outbox WHERE id = ?",
                    (error[:2000], time.time(), record.id),
                )
                self._conn.execute("DELETE FROM outbox WHERE id = ?", (record.id,))
                self._conn.execute("COMMIT")
                return True
            self._conn.execute(
                "UPDATE outbox SET attempts = attempts + 1, last_error = ?, not_before = ? "
                "WHERE id = ?",
                (error[:2000], time.time() + retry_in_s, record.id),
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

    def backlog(self) -> dict[str, Any]:
        """Depth, age of the oldest record, records waiting after a record fault, dead letters."""
        with self._lock:
            depth, oldest, retrying = self._conn.execute(
                "SELECT COUNT(*), MIN(created_at), SUM(attempts > 0) FROM outbox"
            ).fetchone()
            dead = self._conn.execute("SELECT COUNT(*) FROM dead_letter").fetchone()[0]
        return {
            "depth": int(depth),
            "oldest_s": None if oldest is None else round(max(0.0, time.time() - oldest), 1),
            "retrying": int(retrying or 0),
            "dead_letters": int(dead),
        }

    # ---------------------------------------------------------------- dead letters

    def dead(self, ids: list[int] | None = None, *, limit: int = 100) -> list[DeadLetter]:
        """Dead letters, oldest first (all of ``ids`` when given)."""
        query = (
            "SELECT id, kind, key, error, attempts, created_at, failed_at, payload FROM dead_letter"
        )
        with self._lock:
            if ids is None:
                rows = self._conn.execute(query + " ORDER BY id LIMIT ?", (limit,)).fetchall()
            else:
                marks = ",".join("?" * len(ids))
                rows = self._conn.execute(
                    query + f" WHERE id IN ({marks}) ORDER BY id", list(ids)
                ).fetchall()
        return [DeadLetter(*r[:7], payload=json.loads(r[7])) for r in rows]

    def replay(self, ids: list[int] | None = None) -> list[int]:
        """Move dead letters (all when ``ids`` is None) back into the outbox, attempts reset;
        they keep their id, so they flush in their original order. Returns the ids moved."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                if ids is None:
                    ids = [r[0] for r in self._conn.execute("SELECT id FROM dead_letter")]
                moved = []
                for i in ids:
                    cur = self._conn.execute(
                        "INSERT OR IGNORE INTO outbox "
                        "(id, kind, key, payload, blob, attempts, last_error, created_at) "
                        "SELECT id, kind, key, payload, blob, 0, error, created_at "
                        "FROM dead_letter WHERE id = ?",
                        (i,),
                    )
                    if cur.rowcount:
                        self._conn.execute("DELETE FROM dead_letter WHERE id = ?", (i,))
                        moved.append(i)
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
        self.wakeup.set()
        return moved

    def discard(self, ids: list[int], *, reason: str, actor: str | None) -> list[DeadLetter]:
        """Remove dead letters from the flow for good, keeping each in ``discarded`` with the
        reason and who decided. Returns what was discarded."""
        found = self.dead(ids)
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                for d in found:
                    self._conn.execute(
                        "INSERT OR REPLACE INTO discarded (id, kind, key, payload, error, reason, "
                        "actor, created_at, discarded_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (
                            d.id,
                            d.kind,
                            d.key,
                            json.dumps(d.payload),
                            d.error,
                            reason,
                            actor,
                            d.created_at,
                            time.time(),
                        ),
                    )
                    self._conn.execute("DELETE FROM dead_letter WHERE id = ?", (d.id,))
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
        return found


# --------------------------------------------------------------------------- operator actions
# Replaying or discarding a dead letter is a privileged action: ml_lead (or admin), audited in
# the database's append-only audit_log before the outbox file changes.


def _audited(
    session: Session, *, user: User, action: str, letters: list[DeadLetter], detail: dict
) -> None:
    require_role(session=session, user=user, allowed={Role.ML_LEAD}, action=action)
    begin_write(session)
    for d in letters:
        record_audit(
            session=session,
            actor=user,
            action=action,
            outcome="ok",
            target_type=f"outbox_{d.kind}",
            target_id=d.key,
            detail={"record": d.id, "error": (d.error or "")[:500], **detail},
        )
    session.commit()


def replay_dead_letters(
    *, session: Session, outbox: Outbox, user: User, ids: list[int] | None
) -> list[int]:
    """Send dead letters (all when ``ids`` is None) back to the flusher, audited."""
    letters = outbox.dead(ids, limit=1_000_000)
    if ids is not None:
        missing = sorted(set(ids) - {d.id for d in letters})
        if missing:
            raise NotFound(f"no dead letter with id {', '.join(map(str, missing))}")
    if not letters:
        return []
    _audited(session, user=user, action="outbox.replay", letters=letters, detail={})
    return outbox.replay([d.id for d in letters])


def discard_dead_letters(
    *, session: Session, outbox: Outbox, user: User, ids: list[int], reason: str
) -> list[DeadLetter]:
    """Give up on dead letters for good, with a reason: audited, and kept in ``discarded``."""
    reason = reason.strip()
    if len(reason) < 10:
        raise InvalidInput("say why in at least 10 characters (--reason)")
    if not ids:
        raise InvalidInput("name the dead letters to discard (ids from `quarkflow outbox list`)")
    letters = outbox.dead(ids)
    missing = sorted(set(ids) - {d.id for d in letters})
    if missing:
        raise NotFound(f"no dead letter with id {', '.join(map(str, missing))}")
    _audited(
        session, user=user, action="outbox.discard", letters=letters, detail={"reason": reason}
    )
    return outbox.discard(ids, reason=reason, actor=user.username)


class Flusher:
    """Drains the outbox with ``apply(records)`` (one database transaction per call).

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
        max_backoff_s: float = 10.0,
        max_attempts: int = 8,
        max_record_pause_s: float = 300.0,
    ) -> None:
        self.outbox = outbox
        self.apply = apply
        self.is_transient = is_transient
        self.batch = batch
        self.idle_s = idle_s
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
            except BaseException as exc:  # an outage: keep the records, retry
                self.last_error = f"{type(exc).__name__}: {exc}"[:500]
                if self.failing_since is None:
                    self.failing_since = time.time()
                self.retries += 1
                backoff = min(self.max_backoff_s, max(0.25, backoff * 2))
                log.warning("outbox flush failed (%s); retrying in %.1fs", self.last_error, backoff)
                self._stop.wait(backoff)

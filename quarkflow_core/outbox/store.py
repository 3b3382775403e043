"""The outbox file itself: an SQLite database (WAL) holding the records not yet flushed, the
dead letters, the discarded ones, and the ids, labels and projects of every prediction
acknowledged."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quarkflow_core.schema import DEFAULT_PROJECT_ID

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
# Columns added after the first release; an older file gets them on open (a prediction known
# from before projects has project_id NULL: the default project's).
_ADDED = {
    "outbox": {"not_before": "REAL"},
    "dead_letter": {"attempts": "INTEGER"},
    "known_predictions": {"project_id": "INTEGER", "boxes": "TEXT"},
}


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
        """Durably record; returns once committed. A prediction's id, label and project (and a
        detection's boxes) are also kept in ``known_predictions``, so feedback on it can be
        checked while the database is down."""
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
                        "INSERT OR IGNORE INTO known_predictions "
                        "(id, label, created_at, project_id, boxes) VALUES (?, ?, ?, ?, ?)",
                        (
                            key,
                            str(payload["label"]),
                            now,
                            int(payload.get("project_id", DEFAULT_PROJECT_ID)),
                            None if payload.get("boxes") is None else json.dumps(payload["boxes"]),
                        ),
                    )
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
        self.wakeup.set()
        return int(cur.lastrowid)

    def known_label(
        self, prediction_id: str, *, project_id: int = DEFAULT_PROJECT_ID
    ) -> str | None:
        """The label of a project's prediction this outbox acknowledged (at any time), else
        None (also for another project's)."""
        with self._lock:
            row = self._conn.execute(
                "SELECT label FROM known_predictions WHERE id = ? AND COALESCE(project_id, ?) = ?",
                (prediction_id, DEFAULT_PROJECT_ID, project_id),
            ).fetchone()
        return None if row is None else row[0]

    def known_boxes(
        self, prediction_id: str, *, project_id: int = DEFAULT_PROJECT_ID
    ) -> list[dict[str, Any]] | None:
        """The boxes of a project's detection this outbox acknowledged, else None."""
        with self._lock:
            row = self._conn.execute(
                "SELECT boxes FROM known_predictions WHERE id = ? AND COALESCE(project_id, ?) = ?",
                (prediction_id, DEFAULT_PROJECT_ID, project_id),
            ).fetchone()
        return None if row is None or row[0] is None else json.loads(row[0])

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
        """Delete flushed records: one transaction, one statement per 500 ids (one commit
        for a whole flushed batch, not one per record)."""
        if not ids:
            return
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                for start in range(0, len(ids), 500):
                    chunk = list(ids[start : start + 500])
                    marks = ",".join("?" * len(chunk))
                    self._conn.execute(f"DELETE FROM outbox WHERE id IN ({marks})", chunk)  # noqa: S608
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise

    def failed(
        self, record: Record, error: str, *, max_attempts: int, retry_in_s: float = 0.0
    ) -> bool:
        """Count a record fault; the record waits ``retry_in_s`` before its next try, and after
        ``max_attempts`` it moves to the dead letters. Returns True when it was moved."""
        with self._lock:
            if record.attempts + 1 >= max_attempts:
                self._conn.execute("BEGIN IMMEDIATE")
                try:
                    self._conn.execute(
                        "INSERT OR REPLACE INTO dead_letter "
                        "(id, kind, key, payload, blob, error, attempts, created_at, failed_at) "
                        "SELECT id, kind, key, payload, blob, ?, attempts + 1, created_at, ? "
                        "FROM outbox WHERE id = ?",
                        (error[:2000], time.time(), record.id),
                    )
                    self._conn.execute("DELETE FROM outbox WHERE id = ?", (record.id,))
                    self._conn.execute("COMMIT")
                except BaseException:
                    self._conn.execute("ROLLBACK")
                    raise
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

    def dead(self, ids: list[int] | None = None, *, limit: int | None = 100) -> list[DeadLetter]:
        """Dead letters, oldest first: those of ``ids`` when given, else the first ``limit``
        (all with ``limit=None``)."""
        query = (
            "SELECT id, kind, key, error, attempts, created_at, failed_at, payload FROM dead_letter"
        )
        with self._lock:
            if ids is None:
                rows = self._conn.execute(
                    query + " ORDER BY id LIMIT ?", (-1 if limit is None else limit,)
                ).fetchall()
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

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

One part per module: ``store`` (the SQLite file: ``Outbox``, ``Record``, ``DeadLetter``),
``flusher`` (``Flusher``, the draining thread), ``deadletters`` (the audited operator actions
``replay_dead_letters`` / ``discard_dead_letters``, ml_lead only). Callers import from
``quarkflow_core.outbox``.
"""

from __future__ import annotations

from quarkflow_core.outbox.deadletters import discard_dead_letters, replay_dead_letters
from quarkflow_core.outbox.flusher import Flusher
from quarkflow_core.outbox.store import SCHEMA, DeadLetter, Outbox, Record, outbox_path

__all__ = [
    "SCHEMA",
    "DeadLetter",
    "Flusher",
    "Outbox",
    "Record",
    "discard_dead_letters",
    "outbox_path",
    "replay_dead_letters",
]

"""How the outbox's flusher tells an outage (keep every record, retry) from a record fault
(set that record aside, in the end as a dead letter)."""

from __future__ import annotations

from sqlalchemy.exc import DataError, IntegrityError, StatementError

from quarkflow_core.database import is_unreachable
from quarkflow_core.errors import InvalidInput, NotFound, StorageError

# What only a record itself can cause: the database refuses its values (DataError), it clashes
# with a row (IntegrityError: e.g. another server stored the same image a moment ago, which a
# retry resolves), it names a prediction that does not exist, or it cannot be parsed.
RECORD_FAULTS = (
    InvalidInput,
    NotFound,
    DataError,
    IntegrityError,
    KeyError,
    TypeError,
    ValueError,
)


def is_transient(exc: BaseException) -> bool:
    """An outage (retry the batch for as long as it takes) rather than a record fault.

    Anything not known to be the record's fault counts as an outage: an unreachable database or
    storage, a missing bucket, a permission problem. Keeping records and retrying is safe (the
    writers are idempotent); moving a good record aside is not."""
    if isinstance(exc, StorageError):  # network, missing bucket, permissions: all outages
        return True
    if is_unreachable(exc):  # includes "database is locked"
        return True
    if isinstance(exc, StatementError) and isinstance(exc.orig, RECORD_FAULTS):
        return False  # e.g. the driver refused a value before sending it
    return not isinstance(exc, RECORD_FAULTS)

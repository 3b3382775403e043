"""Engines and sessions. Nothing connects at import; engines are built on first use and cached."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from quarkflow_core.errors import DatabaseUnavailable


def _redact(url: str) -> str:
    return make_url(url).render_as_string(hide_password=True)


def _configure_sqlite(engine: Engine) -> None:
    """Real transactions (and SAVEPOINTs) on pysqlite, WAL for concurrent readers, FKs on."""

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record):  # pragma: no cover - driver callback
        dbapi_connection.isolation_level = None  # let SQLAlchemy emit BEGIN itself
        cur = dbapi_connection.cursor()
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA busy_timeout=10000")
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn):  # pragma: no cover - driver callback
        conn.exec_driver_sql("BEGIN")


def make_engine(url: str, **kwargs: object) -> Engine:
    """Create an engine for ``url`` (no connection is made yet)."""
    sa_url = make_url(url)
    if sa_url.get_backend_name() == "sqlite":
        if sa_url.database and sa_url.database != ":memory:":
            Path(sa_url.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30}, **kwargs)
        _configure_sqlite(engine)
        return engine
    kwargs.setdefault("pool_pre_ping", True)
    kwargs.setdefault("connect_args", {"connect_timeout": 5})
    return create_engine(url, **kwargs)


@lru_cache(maxsize=8)
def get_engine(url: str | None = None) -> Engine:
    """The cached engine for ``url`` (default: ``QF_DATABASE_URL``)."""
    if url is None:
        from quarkflow_core.config import get_settings

        url = get_settings().database_url
    return make_engine(url)


def session_factory(engine: Engine | None = None) -> sessionmaker[Session]:
    return sessionmaker(bind=engine or get_engine(), expire_on_commit=False)


@contextmanager
def session_scope(engine: Engine | None = None) -> Iterator[Session]:
    """A session that commits on success and rolls back on any error."""
    session = session_factory(engine)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def check_database(engine: Engine, *, require_migrated: bool = True) -> str:
    """Connect once; raise DatabaseUnavailable with one clear line naming QF_DATABASE_URL.

    Returns the current Alembic revision (or '' when none).
    """
    where = _redact(engine.url.render_as_string(hide_password=False))
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
            try:
                rev = conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
            except SQLAlchemyError:
                rev = None
    except OperationalError as exc:
        reason = str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc)
        raise DatabaseUnavailable(f"QF_DATABASE_URL: cannot connect to {where}: {reason}") from None
    if require_migrated and not rev:
        raise DatabaseUnavailable(
            f"QF_DATABASE_URL: {where} has no Quarkflow schema; run `quarkflow db upgrade`"
        )
    return rev or ""


def begin_write(session: Session) -> None:
    """Make the session's (new) transaction hold the write lock from its first statement.

    On SQLite in WAL mode a transaction that reads and then writes fails at once with
    "database is locked" if another writer committed in between; taking the lock first (a
    no-op UPDATE, which waits on busy_timeout instead) avoids that. Postgres needs nothing."""
    if session.get_bind().dialect.name == "sqlite":
        session.execute(text("UPDATE alembic_version SET version_num = version_num WHERE 1 = 0"))

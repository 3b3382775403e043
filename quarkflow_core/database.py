"""Engines and sessions. Nothing connects at import; engines are built on first use and cached.

**One transaction rule.** Every entry point opens its sessions with ``session_scope``: the API
(``service.session()``, behind the routes' ``DbSession``), the workbench (``app.wb.session``),
the flows (``flows.common.db``) and the CLI (``app.cli.common._session``). The edge (a route, a
command, a flow task, a page callback) owns the transaction: the scope commits once when the
block ends and rolls back when it raises. Core functions flush but do not commit, except these,
which commit in steps by design:

* ``users.authorize``: a refusal is audited in its own committed transaction, so it outlives
  the caller's rollback;
* the registry's writes (``register_version``, ``set_challenger``, ``approve``, ``reject``,
  ``rollback``): each takes the registry lock in a fresh transaction (``events._lock`` ends the
  caller's) and commits the alias move with its event and audit row as one transaction; a
  refused decision is audited and committed like a refusal;
* ``queue.rescore`` (minutes of scoring: one commit per chunk, no lock held while scoring);
* ``training.train`` (the run row is committed when it starts, after every epoch and when it
  fails, so the workbench follows it live and a crash leaves a failed run, not a running one);
* ``review.push_review_items`` / ``review.sync`` (a Label Studio task id is committed as soon as
  the task exists, so a crash never sends an item twice);
* ``demo.bootstrap_champion`` (made of registry writes);
* the outbox's dead-letter replay / discard (audited and committed before the outbox file
  changes).

The service's background work (the outbox flusher, recording token use, re-scoring after a
swap) is an edge of its own: one scope per batch. Calling a function that commits inside a
larger unit of work ends that unit there: call it last, or on its own. docs/architecture.md
("Sessions and transactions") says the same for people."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from quarkflow_core.errors import ConfigError, DatabaseUnavailable


def _redact(url: str) -> str:
    return make_url(url).render_as_string(hide_password=True)


def _configure_sqlite(engine: Engine) -> None:
    """Real transactions (and SAVEPOINTs) on pysqlite, WAL for concurrent readers, FKs on."""

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record):  # pragma: no cover - driver callback
        dbapi_connection.isolation_level = None  # let SQLAlchemy emit BEGIN itself
        cur = dbapi_connection.cursor()
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA busy_timeout=30000")
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
            folder = Path(sa_url.database).parent
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as exc:  # e.g. the embedded default in an image's read-only /app
                raise ConfigError(
                    f"QF_DATABASE_URL: cannot create the SQLite database's folder "
                    f"{folder.resolve()} ({exc.strerror}); set QF_DATABASE_URL (and "
                    "QF_STORAGE_URL) to a writable place or a real server"
                ) from exc
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
    """Sessions on ``engine`` (default: ``get_engine()``); loaded attributes survive a commit."""
    return sessionmaker(bind=engine or get_engine(), expire_on_commit=False)


@contextmanager
def session_scope(engine: Engine | None = None) -> Iterator[Session]:
    """The one way an entry point gets a session: it commits when the block ends and rolls
    back on any error (Streamlit's rerun and stop included), then closes."""
    session = session_factory(engine)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def check_database(
    engine: Engine, *, require_migrated: bool = True, setting: str = "QF_DATABASE_URL"
) -> str:
    """Connect once; raise DatabaseUnavailable with one clear line naming ``setting`` (the
    variable the URL came from).

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
        raise DatabaseUnavailable(f"{setting}: cannot connect to {where}: {reason}") from None
    if require_migrated and not rev:
        raise DatabaseUnavailable(
            f"{setting}: {where} has no Quarkflow schema; run `quarkflow db upgrade`"
        )
    return rev or ""


def begin_write(session: Session) -> None:
    """Make the session's (new) transaction hold the write lock from its first statement.

    On SQLite in WAL mode a transaction that reads and then writes fails at once with
    "database is locked" if another writer committed in between; taking the lock first (a
    no-op UPDATE, which waits on busy_timeout instead) avoids that. Postgres needs nothing."""
    if session.get_bind().dialect.name == "sqlite":
        session.execute(text("UPDATE alembic_version SET version_num = version_num WHERE 1 = 0"))


# --------------------------------------------------------------------------- the app's role

# History is kept for ever: rows of these tables are never changed or removed (triggers in
# db/versions 0001 and 0003; the ORM guard in quarkflow_core.schema).
APPEND_ONLY_TABLES = ("promotion_events", "audit_log", "model_versions")
READ_ONLY_TABLES = ("alembic_version",)  # the schema's revision: written by migrations only
APP_PRIVILEGES = ("SELECT", "INSERT", "UPDATE", "DELETE")
APPEND_ONLY_PRIVILEGES = ("SELECT", "INSERT")


def app_privileges(table: str) -> tuple[str, ...]:
    """What the application's role may do to ``table``."""
    if table in READ_ONLY_TABLES:
        return ("SELECT",)
    if table in APPEND_ONLY_TABLES:
        return APPEND_ONLY_PRIVILEGES
    return APP_PRIVILEGES


def grant_app_role(engine: Engine, role: str, *, schema: str = "public") -> dict[str, list[str]]:
    """Give the Postgres role the API and workers connect as exactly what they need, as the
    owner of the tables (the migration role). Safe to repeat; run after every migration.

    - USAGE on ``schema``;
    - every table: SELECT, INSERT, UPDATE, DELETE, except the append-only history
      (SELECT, INSERT) and ``alembic_version`` (SELECT); whatever else it had is revoked;
    - USAGE, SELECT on the sequences (ids);
    - default privileges, so tables and sequences the owner creates later get the same base
      grants (the next run of this function narrows the append-only ones).

    The role must exist and must not be the owner (or a member of it), a superuser or able to
    create roles (on Postgres 15 that lets it join the owner): an owner can disable the
    triggers and drop the tables. No TRUNCATE, REFERENCES or TRIGGER privilege is granted.
    Returns {table: privileges}."""
    if engine.dialect.name != "postgresql":
        raise ConfigError(
            "QF_DATABASE_APP_ROLE: database roles need Postgres; the SQLite database has none"
        )
    if not role:
        raise ConfigError("QF_DATABASE_APP_ROLE: no role given")
    quote = engine.dialect.identifier_preparer.quote
    who, where = quote(role), quote(schema)
    granted: dict[str, list[str]] = {}
    with engine.begin() as conn:
        found = conn.execute(
            text("SELECT rolsuper, rolcreaterole FROM pg_roles WHERE rolname = :r"), {"r": role}
        ).first()
        if found is None:
            raise ConfigError(
                f"QF_DATABASE_APP_ROLE: Postgres role {role!r} does not exist; create it first "
                f"(as an administrator): CREATE ROLE {who} LOGIN PASSWORD '...'"
            )
        tables = conn.execute(
            text(
                "SELECT tablename, tableowner, pg_has_role(:r, tableowner, 'MEMBER') "
                "FROM pg_tables WHERE schemaname = :s ORDER BY tablename"
            ),
            {"r": role, "s": schema},
        ).all()
        owners = sorted({owner for _, owner, member in tables if member})
        why = None
        if found.rolsuper:
            why = "a superuser"
        elif owners:
            why = f"the owner of the tables ({owners[0]}) or a member of it"
        elif found.rolcreaterole:
            why = "allowed to create roles (CREATEROLE: it can make itself a member of the owner)"
        if why:
            raise ConfigError(
                f"QF_DATABASE_APP_ROLE: {role!r} is {why}, so it could disable the "
                "append-only triggers or drop the history; the API and workers need a role "
                "that does not own the tables"
            )
        conn.execute(text(f"GRANT USAGE ON SCHEMA {where} TO {who}"))
        for table, _, _ in tables:
            privileges = app_privileges(table)
            name = f"{where}.{quote(table)}"
            conn.execute(text(f"REVOKE ALL ON TABLE {name} FROM {who}"))
            conn.execute(text(f"GRANT {', '.join(privileges)} ON TABLE {name} TO {who}"))
            granted[table] = list(privileges)
        conn.execute(text(f"GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA {where} TO {who}"))
        base = ", ".join(APP_PRIVILEGES)
        conn.execute(
            text(f"ALTER DEFAULT PRIVILEGES IN SCHEMA {where} GRANT {base} ON TABLES TO {who}")
        )
        conn.execute(
            text(
                f"ALTER DEFAULT PRIVILEGES IN SCHEMA {where} "
                f"GRANT USAGE, SELECT ON SEQUENCES TO {who}"
            )
        )
    return granted


def is_unreachable(exc: BaseException) -> bool:
    """The database could not be reached or stayed busy (an outage to wait out), as opposed to
    a statement it refused: OperationalError (includes SQLite's "database is locked"), a
    connection the driver reports lost, or our own DatabaseUnavailable."""
    if isinstance(exc, OperationalError | DatabaseUnavailable):
        return True
    return isinstance(exc, DBAPIError) and exc.connection_invalidated

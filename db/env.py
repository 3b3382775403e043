"""Alembic environment: URL from the caller (quarkflow db ...) or from QF_DATABASE_URL."""

from __future__ import annotations

from alembic import context

from quarkflow_core.database import make_engine
from quarkflow_core.schema import Base

config = context.config
target_metadata = Base.metadata


def _url() -> str:
    url = config.attributes.get("database_url") or config.get_main_option("sqlalchemy.url")
    if not url:
        from quarkflow_core.config import get_settings

        url = get_settings().database_url
    return url


def run_migrations_offline() -> None:
    context.configure(
        url=_url(),
        target_metadata=target_metadata,
        literal_binds=True,
        render_as_batch=True,
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    engine = make_engine(_url())
    try:
        with engine.connect() as conn:
            _run(conn)
    finally:
        engine.dispose()


def _sqlite_foreign_keys(connection, on: bool) -> None:
    """SQLite: foreign keys off while batch mode rebuilds tables that others reference (a
    rebuild drops and renames the table), and checked when they come back on. The pragma is a
    no-op inside a transaction, so it goes straight to the driver's connection between them."""
    if connection.dialect.name != "sqlite" or connection.in_transaction():
        return
    raw = connection.connection.driver_connection
    raw.execute(f"PRAGMA foreign_keys={'ON' if on else 'OFF'}")
    if on:
        broken = raw.execute("PRAGMA foreign_key_check").fetchall()
        if broken:
            raise RuntimeError(f"migration left rows that break foreign keys: {broken[:5]}")


def _run(connection) -> None:
    _sqlite_foreign_keys(connection, on=False)
    try:
        _configure_and_run(connection)
    finally:
        _sqlite_foreign_keys(connection, on=True)


def _configure_and_run(connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=True,  # SQLite needs batch mode for ALTER
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()
    if connection.in_transaction():
        connection.commit()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()

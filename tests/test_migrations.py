"""Alembic owns the schema: round trip, no drift, and DB-level invariants on both backends."""

import pytest
from sqlalchemy import inspect, text
from sqlalchemy.exc import DBAPIError, IntegrityError

from quarkflow_core import migrations
from quarkflow_core.database import make_engine

pytestmark = pytest.mark.integration

TABLES = {
    "users",
    "api_tokens",
    "images",
    "predictions",
    "feedback",
    "review_items",
    "annotations",
    "dataset_snapshots",
    "dataset_members",
    "training_runs",
    "model_versions",
    "model_aliases",
    "promotion_events",
    "audit_log",
}


def test_upgrade_downgrade_upgrade_round_trip_and_no_drift(fresh_db_url, db_backend):
    engine = make_engine(fresh_db_url)
    try:
        migrations.upgrade(fresh_db_url)
        assert set(inspect(engine).get_table_names()) >= TABLES
        migrations.downgrade(fresh_db_url, "base")
        assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
        migrations.upgrade(fresh_db_url)
        assert set(inspect(engine).get_table_names()) >= TABLES
        migrations.check_drift(fresh_db_url)  # raises when models and migrations disagree
        assert migrations.is_current(engine)
        assert engine.dialect.name == db_backend
    finally:
        engine.dispose()


def test_dashboard_time_indexes_exist(db_engine):
    insp = inspect(db_engine)
    for table in ("predictions", "feedback", "audit_log", "promotion_events"):
        cols = [ix["column_names"][0] for ix in insp.get_indexes(table)]
        assert "created_at" in cols, table


@pytest.mark.parametrize("table", ["audit_log", "promotion_events"])
def test_history_tables_are_append_only_in_the_database(db_session, table):
    if table == "audit_log":
        db_session.execute(
            text(
                "INSERT INTO audit_log (action, outcome, detail, created_at) "
                "VALUES ('probe', 'ok', '{}', CURRENT_TIMESTAMP)"
            )
        )
    else:
        db_session.execute(
            text(
                "INSERT INTO promotion_events (action, alias, actor, reason, evidence, created_at) "
                "VALUES ('approve', 'champion', 'x', 'why', '{}', CURRENT_TIMESTAMP)"
            )
        )
    for stmt in (f"UPDATE {table} SET created_at = CURRENT_TIMESTAMP", f"DELETE FROM {table}"):
        nested = db_session.begin_nested()
        with pytest.raises(DBAPIError, match="append-only"):
            db_session.execute(text(stmt))
        nested.rollback()


def test_enum_columns_reject_unknown_values(db_session):
    nested = db_session.begin_nested()
    with pytest.raises(IntegrityError):
        db_session.execute(
            text(
                "INSERT INTO users (username, role, is_active, created_at) "
                "VALUES ('mallory', 'superuser', true, CURRENT_TIMESTAMP)"
            )
        )
    nested.rollback()

"""append-only history: TRUNCATE is refused too (Postgres)

0001 refuses UPDATE and DELETE of the history rows, row by row. TRUNCATE fires no row
trigger, so on Postgres each append-only table also gets a statement-level BEFORE TRUNCATE
trigger (it fires for tables reached by TRUNCATE ... CASCADE as well). SQLite has no
TRUNCATE: nothing to do there.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02 10:00:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The same tables as 0001's APPEND_ONLY.
APPEND_ONLY = ("promotion_events", "audit_log", "model_versions")


def _postgres() -> bool:
    return op.get_bind().dialect.name == "postgresql"


def upgrade() -> None:
    if not _postgres():
        return
    op.execute(
        "CREATE FUNCTION qf_forbid_truncate() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
        "RAISE EXCEPTION '% rows are append-only: TRUNCATE is refused', TG_TABLE_NAME; END $$"
    )
    for table in APPEND_ONLY:
        op.execute(
            f"CREATE TRIGGER {table}_no_truncate BEFORE TRUNCATE ON {table} "
            "FOR EACH STATEMENT EXECUTE FUNCTION qf_forbid_truncate()"
        )


def downgrade() -> None:
    if not _postgres():
        return
    for table in APPEND_ONLY:
        op.execute(f"DROP TRIGGER IF EXISTS {table}_no_truncate ON {table}")
    op.execute("DROP FUNCTION IF EXISTS qf_forbid_truncate()")

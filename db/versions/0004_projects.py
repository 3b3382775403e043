"""projects: every row of a project's work carries project_id; existing data is the default project

Creates ``projects`` (name, task type, class list, policy overrides, Label Studio project) and
``project_grants`` (a user's role in one project), then adds ``project_id`` (NOT NULL, default
1, indexed, a foreign key to projects) to images, predictions, review_items, dataset_snapshots,
training_runs, model_versions, model_aliases and promotion_events. Uniqueness becomes per
project: an image's sha256, a snapshot's content hash, a version number, an alias.

The default project (id 1, ``default``, classification) is created first, with the class list
of the champion (or of the newest version) when the installation has one, so every existing
row, command and path keeps working against it.

SQLite rebuilds the tables in batch mode (db/env.py turns foreign keys off around it and checks
them after); the rebuild drops the append-only triggers of model_versions and
promotion_events, so they are created again.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-05 23:30:00
"""

import json
from collections.abc import Sequence
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SCOPED = (
    "images",
    "predictions",
    "review_items",
    "dataset_snapshots",
    "training_runs",
    "model_versions",
    "model_aliases",
    "promotion_events",
)
INDEXED = tuple(t for t in SCOPED if t != "model_aliases")  # its primary key leads with it
# (table, old unique constraint, column, new unique constraint)
UNIQUE = (
    ("images", "uq_images_sha256", "sha256", "uq_images_project_sha256"),
    (
        "dataset_snapshots",
        "uq_dataset_snapshots_content_hash",
        "content_hash",
        "uq_dataset_snapshots_project_hash",
    ),
    ("model_versions", "uq_model_versions_version", "version", "uq_model_versions_project_version"),
)
ROLES = ("domain_expert", "analyst", "ml_lead", "admin")
# 0001's append-only tables that get project_id (audit_log does not)
APPEND_ONLY = ("model_versions", "promotion_events")


INSERT_DEFAULT_SQLITE = (
    "INSERT INTO projects (id, name, title, task_type, classes, policy, created_by, created_at) "
    "VALUES (1, 'default', NULL, 'classification', :classes, '{}', 'migration 0004', :now)"
)
INSERT_DEFAULT_POSTGRES = (
    "INSERT INTO projects (id, name, title, task_type, classes, policy, created_by, created_at) "
    "VALUES (1, 'default', NULL, 'classification', CAST(:classes AS JSONB), '{}'::jsonb, "
    "'migration 0004', CAST(:now AS TIMESTAMP))"
)


def _sqlite() -> bool:
    return op.get_bind().dialect.name == "sqlite"


def _json() -> sa.types.TypeEngine:
    return sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")


def _append_only_triggers(drop: bool = False) -> None:
    """SQLite's per-statement triggers, as 0001 creates them (batch mode's copy loses them)."""
    if not _sqlite():
        return
    for table in APPEND_ONLY:
        for verb in ("UPDATE", "DELETE"):
            name = f"{table}_no_{verb.lower()}"
            if drop:
                op.execute(f"DROP TRIGGER IF EXISTS {name}")
            else:
                op.execute(
                    f"CREATE TRIGGER {name} BEFORE {verb} ON {table} "
                    f"BEGIN SELECT RAISE(ABORT, '{table} rows are append-only'); END"
                )


def _offline() -> bool:
    """``alembic upgrade --sql``: no data to read, only SQL to print."""
    return op.get_context().as_sql


def _default_classes() -> list[str]:
    if _offline():  # the default project then starts empty; its first version sets them
        return []
    bind = op.get_bind()
    raw = bind.execute(
        sa.text(
            "SELECT v.classes FROM model_versions v JOIN model_aliases a ON a.version_id = v.id "
            "WHERE a.alias = 'champion'"
        )
    ).scalar()
    if raw is None:
        raw = bind.execute(
            sa.text("SELECT classes FROM model_versions ORDER BY version DESC LIMIT 1")
        ).scalar()
    if isinstance(raw, str):
        raw = json.loads(raw)
    return [str(c) for c in raw or []]


def upgrade() -> None:
    op.create_table(
        "projects",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("title", sa.String(length=128), nullable=True),
        sa.Column(
            "task_type",
            sa.Enum(
                "classification",
                name="task_type",
                native_enum=False,
                create_constraint=True,
                length=32,
            ),
            nullable=False,
        ),
        sa.Column("classes", _json(), nullable=False),
        sa.Column("policy", _json(), nullable=False),
        sa.Column("labelstudio_project_id", sa.Integer(), nullable=True),
        sa.Column("created_by", sa.String(length=64), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_projects")),
        sa.UniqueConstraint("name", name=op.f("uq_projects_name")),
    )
    op.create_table(
        "project_grants",
        sa.Column("project_id", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column(
            "role",
            sa.Enum(*ROLES, name="role", native_enum=False, create_constraint=True, length=32),
            nullable=False,
        ),
        sa.Column("granted_by", sa.String(length=64), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["project_id"],
            ["projects.id"],
            name=op.f("fk_project_grants_project_id_projects"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["user_id"],
            ["users.id"],
            name=op.f("fk_project_grants_user_id_users"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("project_id", "user_id", name="pk_project_grants"),
    )
    with op.batch_alter_table("project_grants", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_project_grants_user_id"), ["user_id"], unique=False)
    # plain SQL with string values, so `alembic upgrade --sql` can print it too
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")  # naive UTC, as UTCDateTime
    op.execute(
        sa.text(INSERT_DEFAULT_SQLITE if _sqlite() else INSERT_DEFAULT_POSTGRES).bindparams(
            sa.bindparam("classes", json.dumps(_default_classes()), type_=sa.String()),
            sa.bindparam("now", now, type_=sa.String()),
        )
    )
    if not _sqlite():  # the sequence must not hand out 1 again
        op.execute("SELECT setval(pg_get_serial_sequence('projects', 'id'), 1)")
    _append_only_triggers(drop=True)
    for table in SCOPED:
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.add_column(
                sa.Column("project_id", sa.Integer(), server_default=sa.text("1"), nullable=False)
            )
            batch_op.create_foreign_key(
                batch_op.f(f"fk_{table}_project_id_projects"), "projects", ["project_id"], ["id"]
            )
            if table in INDEXED:
                batch_op.create_index(batch_op.f(f"ix_{table}_project_id"), ["project_id"])
            for t, old, column, new in UNIQUE:
                if t == table:
                    batch_op.drop_constraint(old, type_="unique")
                    batch_op.create_unique_constraint(new, ["project_id", column])
            if table == "model_aliases":
                batch_op.drop_constraint("pk_model_aliases", type_="primary")
                batch_op.create_primary_key("pk_model_aliases", ["project_id", "alias"])
    _append_only_triggers()


def downgrade() -> None:
    bind = op.get_bind()
    n = None if _offline() else bind.execute(sa.text("SELECT count(*) FROM projects")).scalar()
    if n and n > 1:
        raise RuntimeError(
            f"{n} projects exist: a downgrade below 0004 would merge their rows into one; "
            "delete the other projects' data first"
        )
    _append_only_triggers(drop=True)
    for table in reversed(SCOPED):
        with op.batch_alter_table(table, schema=None) as batch_op:
            if table == "model_aliases":
                batch_op.drop_constraint("pk_model_aliases", type_="primary")
                batch_op.create_primary_key("pk_model_aliases", ["alias"])
            for t, old, column, new in UNIQUE:
                if t == table:
                    batch_op.drop_constraint(new, type_="unique")
                    batch_op.create_unique_constraint(old, [column])
            if table in INDEXED:
                batch_op.drop_index(batch_op.f(f"ix_{table}_project_id"))
            batch_op.drop_constraint(
                batch_op.f(f"fk_{table}_project_id_projects"), type_="foreignkey"
            )
            batch_op.drop_column("project_id")
    _append_only_triggers()
    with op.batch_alter_table("project_grants", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_project_grants_user_id"))
    op.drop_table("project_grants")
    op.drop_table("projects")

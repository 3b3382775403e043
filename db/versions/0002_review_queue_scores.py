"""review queue: the scoring model's view of each item, closed state, who decided

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-30 02:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OLD_STATES = ("open", "sent", "disputed", "resolved", "dismissed")
NEW_STATES = (*OLD_STATES, "closed")


def _state_type(states: Sequence[str]) -> sa.Enum:
    return sa.Enum(
        *states, name="review_state", native_enum=False, create_constraint=True, length=32
    )


def _set_states(batch_op: object, old: Sequence[str], new: Sequence[str]) -> None:
    """Postgres: replace the CHECK constraint; SQLite: the batch copy takes the new type."""
    if op.get_bind().dialect.name == "postgresql":
        name = op.f("ck_review_items_review_state")
        op.drop_constraint(name, "review_items", type_="check")
        values = ", ".join(f"'{s}'" for s in new)
        op.create_check_constraint(name, "review_items", f"state IN ({values})")
    else:
        batch_op.alter_column(  # type: ignore[attr-defined]
            "state", existing_type=_state_type(old), type_=_state_type(new), nullable=False
        )


def upgrade() -> None:
    json_type = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")
    with op.batch_alter_table("review_items", schema=None) as batch_op:
        batch_op.add_column(sa.Column("scored_version", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("scored_label", sa.String(length=128), nullable=True))
        batch_op.add_column(sa.Column("scored_confidence", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("scored_topk", json_type, nullable=True))
        batch_op.add_column(sa.Column("note", sa.String(length=256), nullable=True))
        batch_op.add_column(sa.Column("decided_by_id", sa.Integer(), nullable=True))
        batch_op.create_foreign_key(
            batch_op.f("fk_review_items_decided_by_id_users"), "users", ["decided_by_id"], ["id"]
        )
        _set_states(batch_op, OLD_STATES, NEW_STATES)


def downgrade() -> None:
    op.execute("UPDATE review_items SET state = 'open' WHERE state = 'closed'")
    with op.batch_alter_table("review_items", schema=None) as batch_op:
        _set_states(batch_op, NEW_STATES, OLD_STATES)
        batch_op.drop_constraint(
            batch_op.f("fk_review_items_decided_by_id_users"), type_="foreignkey"
        )
        for column in (
            "decided_by_id",
            "note",
            "scored_topk",
            "scored_confidence",
            "scored_label",
            "scored_version",
        ):
            batch_op.drop_column(column)

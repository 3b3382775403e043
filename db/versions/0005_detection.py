"""detection: the task type, and boxes on every row that carries a label

A project's ``task_type`` may now be ``detection``. Boxes are JSON lists of
``{"label", "box": [x1, y1, x2, y2]}`` in pixels of the original image (``"score"`` on a
model's boxes), nullable, on the rows that carry a classification label today:

* ``predictions.boxes``: what the model found (a detection prediction's ``label`` and
  ``confidence`` summarise them: the top box's label and score);
* ``feedback.boxes``: the expert's verdict per box (and boxes they drew for missed objects);
* ``annotations.boxes``: an annotator's (or the seed's) boxes;
* ``dataset_members.boxes``: a snapshot member's ground truth;
* ``review_items.scored_boxes`` / ``resolved_boxes``: what the scoring model found, and the
  boxes people settled on.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-06 02:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OLD_TYPES = ("classification",)
NEW_TYPES = (*OLD_TYPES, "detection")
BOX_COLUMNS = (
    ("predictions", "boxes"),
    ("feedback", "boxes"),
    ("annotations", "boxes"),
    ("dataset_members", "boxes"),
    ("review_items", "scored_boxes"),
    ("review_items", "resolved_boxes"),
)


def _json() -> sa.types.TypeEngine:
    return sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")


def _task_type(types: Sequence[str]) -> sa.Enum:
    return sa.Enum(*types, name="task_type", native_enum=False, create_constraint=True, length=32)


def _set_types(old: Sequence[str], new: Sequence[str]) -> None:
    """Postgres: replace the CHECK constraint; SQLite: a batch copy takes the new type."""
    if op.get_bind().dialect.name == "postgresql":
        name = op.f("ck_projects_task_type")
        op.drop_constraint(name, "projects", type_="check")
        values = ", ".join(f"'{t}'" for t in new)
        op.create_check_constraint(name, "projects", f"task_type IN ({values})")
        return
    with op.batch_alter_table("projects", schema=None) as batch_op:
        batch_op.alter_column(
            "task_type", existing_type=_task_type(old), type_=_task_type(new), nullable=False
        )


def upgrade() -> None:
    _set_types(OLD_TYPES, NEW_TYPES)
    for table, column in BOX_COLUMNS:
        op.add_column(table, sa.Column(column, _json(), nullable=True))


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        tables = sorted({t for t, _ in BOX_COLUMNS})
        for table in tables:
            with op.batch_alter_table(table, schema=None) as batch_op:
                for t, column in BOX_COLUMNS:
                    if t == table:
                        batch_op.drop_column(column)
    else:
        for table, column in BOX_COLUMNS:
            op.drop_column(table, column)
    n = op.get_bind().execute(
        sa.text("SELECT count(*) FROM projects WHERE task_type = 'detection'")
    )
    if n.scalar():
        raise RuntimeError("detection projects exist; a schema before 0005 cannot hold them")
    _set_types(NEW_TYPES, OLD_TYPES)

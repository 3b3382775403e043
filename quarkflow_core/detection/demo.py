"""The detection half of ``make demo``: a project of digits pasted onto photos."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from quarkflow_core.detection.seed import DIGIT_CLASSES
from quarkflow_core.projects import create_project
from quarkflow_core.schema import Project, TaskType

DEMO_PROJECT = "digits-on-photos"
DEMO_TITLE = "Digits on photos (object detection)"


def ensure_demo_project(*, session: Session) -> Project:
    """The demo's detection project, created once (by the demo, not by a person)."""
    row = session.scalar(select(Project).where(Project.name == DEMO_PROJECT))
    if row is not None:
        return row
    return create_project(
        session=session,
        name=DEMO_PROJECT,
        classes=DIGIT_CLASSES,
        task_type=TaskType.DETECTION,
        title=DEMO_TITLE,
        created_by="demo",
    )

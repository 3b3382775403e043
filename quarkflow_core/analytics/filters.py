"""The filter every workbench query shares: a time range, a model version, a predicted label,
always within one project (``where(session, project_id=...)``)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import false, select
from sqlalchemy.orm import Session

from quarkflow_core.schema import ModelVersion, Prediction


@dataclass(frozen=True)
class Filters:
    start: datetime | None = None
    end: datetime | None = None
    model_version: int | None = None  # the version *number*, in the project's own count
    label: str | None = None

    def where(self, session: Session, *, project_id: int) -> list[Any]:
        """Conditions on ``Prediction`` for one project; a version number the project does
        not have matches nothing."""
        conds: list[Any] = [Prediction.project_id == project_id]
        if self.start is not None:
            conds.append(Prediction.created_at >= self.start)
        if self.end is not None:
            conds.append(Prediction.created_at < self.end)
        if self.model_version is not None:
            vid = session.scalar(
                select(ModelVersion.id).where(
                    ModelVersion.project_id == project_id,
                    ModelVersion.version == self.model_version,
                )
            )
            conds.append(Prediction.model_version_id == vid if vid is not None else false())
        if self.label:
            conds.append(Prediction.label == self.label)
        return conds

"""The filter every workbench query shares: a time range, a model version, a predicted label."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from quarkflow_core.schema import ModelVersion, Prediction


@dataclass(frozen=True)
class Filters:
    start: datetime | None = None
    end: datetime | None = None
    model_version: int | None = None  # the version *number*
    label: str | None = None

    def where(self, session: Session) -> list[Any]:
        conds: list[Any] = []
        if self.start is not None:
            conds.append(Prediction.created_at >= self.start)
        if self.end is not None:
            conds.append(Prediction.created_at < self.end)
        if self.model_version is not None:
            vid = session.scalar(
                select(ModelVersion.id).where(ModelVersion.version == self.model_version)
            )
            conds.append(Prediction.model_version_id == vid)
        if self.label:
            conds.append(Prediction.label == self.label)
        return conds

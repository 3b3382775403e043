"""The schema's building blocks: the declarative base and its naming convention, the portable
column types (timestamps as naive UTC that come back aware, JSON/JSONB, enums as VARCHAR +
CHECK) and the enums the tables use."""

from __future__ import annotations

import enum
import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    DateTime,
    Enum,
    MetaData,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase
from sqlalchemy.types import TypeDecorator

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_uuid() -> str:
    return str(uuid.uuid4())


class UTCDateTime(TypeDecorator):
    """Store naive UTC, return aware UTC: identical behaviour on SQLite and Postgres."""

    impl = DateTime(timezone=False)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given; pass an aware (UTC) datetime")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        return None if value is None else value.replace(tzinfo=UTC)


JSONType = JSON().with_variant(JSONB(), "postgresql")


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {  # noqa: RUF012 - SQLAlchemy reads this class attribute
        datetime: UTCDateTime(),
        dict[str, Any]: JSONType,
        list[Any]: JSONType,
    }


def enum_column(cls: type[enum.Enum], name: str) -> Enum:
    return Enum(
        cls,
        name=name,
        native_enum=False,
        create_constraint=True,
        length=32,
        values_callable=lambda e: [m.value for m in e],
        validate_strings=True,
    )


def json_safe(obj: Any) -> Any:
    """A JSON-safe copy (NaN/inf -> None; tuples -> lists; other objects -> str) that Postgres
    JSONB accepts and that hashes the same after a database round trip."""
    import json
    import math

    def clean(o: Any) -> Any:
        if isinstance(o, float):
            return o if math.isfinite(o) else None
        if isinstance(o, dict):
            return {str(k): clean(v) for k, v in o.items()}
        if isinstance(o, list | tuple):
            return [clean(v) for v in o]
        return o

    return json.loads(json.dumps(clean(obj), default=str))


def parse_enum(cls: type[enum.StrEnum], value: object, what: str):
    """``cls(value)``, or InvalidInput naming the valid values."""
    from quarkflow_core.errors import InvalidInput

    try:
        return cls(value)
    except ValueError:
        valid = ", ".join(v.value for v in cls)
        raise InvalidInput(f"unknown {what} {value!r}; valid: {valid}") from None


class TaskType(enum.StrEnum):
    """What a project's models do: one label per image, or labelled boxes."""

    CLASSIFICATION = "classification"
    DETECTION = "detection"


class Role(enum.StrEnum):
    DOMAIN_EXPERT = "domain_expert"
    ANALYST = "analyst"
    ML_LEAD = "ml_lead"
    ADMIN = "admin"


class Verdict(enum.StrEnum):
    CORRECT = "correct"
    WRONG = "wrong"


class ReviewReason(enum.StrEnum):
    LOW_CONFIDENCE = "low_confidence"
    USER_DISPUTED = "user_disputed"
    LABEL_NOISE = "label_noise"
    SAMPLED = "sampled"


class ReviewState(enum.StrEnum):
    OPEN = "open"
    SENT = "sent"  # pushed to Label Studio
    DISPUTED = "disputed"  # humans and/or model disagree; needs a decision
    RESOLVED = "resolved"
    DISMISSED = "dismissed"
    CLOSED = "closed"  # the serving model became confident; no person needed (``note`` says why)


class AnnotationSource(enum.StrEnum):
    SEED = "seed"
    FEEDBACK = "feedback"
    LABEL_STUDIO = "label_studio"


class Split(enum.StrEnum):
    TRAIN = "train"
    VAL = "val"
    HOLDOUT = "holdout"


class RunStatus(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


class PromotionAction(enum.StrEnum):
    APPROVE = "approve"
    REJECT = "reject"
    ROLLBACK = "rollback"
    SET_CHALLENGER = "set_challenger"

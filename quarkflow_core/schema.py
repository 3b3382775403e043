"""The relational schema (SQLAlchemy 2.0 typed ORM). Alembic in ``db/`` owns the DDL.

Portable by construction: enums are VARCHAR + CHECK, JSON is JSON/JSONB, timestamps are stored
as naive UTC and come back timezone-aware on both SQLite and Postgres.
"""

from __future__ import annotations

import enum
import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    event,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship
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


def _enum(cls: type[enum.Enum], name: str) -> Enum:
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


# --------------------------------------------------------------------------- people


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    username: Mapped[str] = mapped_column(String(64), unique=True)
    display_name: Mapped[str | None] = mapped_column(String(128))
    role: Mapped[Role] = mapped_column(_enum(Role, "role"))
    password_hash: Mapped[str | None] = mapped_column(String(256))
    is_active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ApiToken(Base):
    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(64))
    prefix: Mapped[str] = mapped_column(String(16))  # shown to people; not secret
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)  # HMAC-SHA256 hex
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime | None]
    last_used_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]

    user: Mapped[User] = relationship()


# --------------------------------------------------------------------------- images & predictions


class Image(Base):
    __tablename__ = "images"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64), unique=True)
    storage_key: Mapped[str] = mapped_column(String(256))
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    format: Mapped[str] = mapped_column(String(16))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    source: Mapped[str] = mapped_column(String(32))  # seed / upload / batch / ...
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Prediction(Base):
    __tablename__ = "predictions"
    __table_args__ = (
        Index("ix_predictions_created_at", "created_at"),
        Index("ix_predictions_version_created", "model_version_id", "created_at"),
        Index("ix_predictions_label_created", "label", "created_at"),
    )

    # Client-generated UUID: a prediction logged through the outbox keeps its id.
    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_uuid)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id"), index=True)
    model_version_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id"))
    label: Mapped[str] = mapped_column(String(128))
    confidence: Mapped[float] = mapped_column(Float)  # calibrated
    topk: Mapped[list[Any]] = mapped_column(default=list)  # [{"label":..,"confidence":..}]
    latency_ms: Mapped[float] = mapped_column(Float)
    request_id: Mapped[str | None] = mapped_column(String(64))
    user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    image: Mapped[Image] = relationship()


class Feedback(Base):
    __tablename__ = "feedback"
    __table_args__ = (Index("ix_feedback_created_at", "created_at"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_uuid)
    prediction_id: Mapped[str] = mapped_column(ForeignKey("predictions.id"), index=True)
    user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"))
    verdict: Mapped[Verdict] = mapped_column(_enum(Verdict, "verdict"))
    true_label: Mapped[str | None] = mapped_column(String(128))
    comment: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ReviewItem(Base):
    """One per image (de-duplicated). ``scored_*``: what the model that last scored the image
    (normally the current champion) said, which sets ``priority``; see quarkflow_core.queue."""

    __tablename__ = "review_items"
    __table_args__ = (
        Index("ix_review_items_state_priority", "state", "priority"),
        Index("ix_review_items_created_at", "created_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id"), unique=True)
    prediction_id: Mapped[str | None] = mapped_column(ForeignKey("predictions.id"))
    reason: Mapped[ReviewReason] = mapped_column(_enum(ReviewReason, "review_reason"))
    state: Mapped[ReviewState] = mapped_column(
        _enum(ReviewState, "review_state"), default=ReviewState.OPEN
    )
    priority: Mapped[float] = mapped_column(Float, default=0.0)  # higher = sooner
    resolved_label: Mapped[str | None] = mapped_column(String(128))
    external_task_id: Mapped[str | None] = mapped_column(String(64))
    scored_version: Mapped[int | None] = mapped_column(Integer)
    scored_label: Mapped[str | None] = mapped_column(String(128))
    scored_confidence: Mapped[float | None] = mapped_column(Float)
    scored_topk: Mapped[list[Any] | None] = mapped_column()
    note: Mapped[str | None] = mapped_column(String(256))  # why it was closed / settled
    decided_by_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class Annotation(Base):
    __tablename__ = "annotations"
    __table_args__ = (
        UniqueConstraint("source", "external_id", name="uq_annotations_source_external_id"),
        Index("ix_annotations_created_at", "created_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id"), index=True)
    label: Mapped[str] = mapped_column(String(128))
    source: Mapped[AnnotationSource] = mapped_column(_enum(AnnotationSource, "annotation_source"))
    annotator: Mapped[str | None] = mapped_column(String(128))
    user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"))
    external_id: Mapped[str | None] = mapped_column(String(128))  # idempotency key
    external_task_id: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


# --------------------------------------------------------------------------- datasets & training


class DatasetSnapshot(Base):
    __tablename__ = "dataset_snapshots"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128))
    content_hash: Mapped[str] = mapped_column(String(64), unique=True)
    classes: Mapped[list[Any]] = mapped_column(default=list)
    class_counts: Mapped[dict[str, Any]] = mapped_column(default=dict)  # {split: {label: n}}
    num_items: Mapped[int] = mapped_column(Integer)
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("dataset_snapshots.id"))
    notes: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class DatasetMember(Base):
    __tablename__ = "dataset_members"
    __table_args__ = (Index("ix_dataset_members_snapshot_split", "snapshot_id", "split"),)

    snapshot_id: Mapped[int] = mapped_column(
        ForeignKey("dataset_snapshots.id", ondelete="CASCADE"), primary_key=True
    )
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id"), primary_key=True)
    label: Mapped[str] = mapped_column(String(128))
    split: Mapped[Split] = mapped_column(_enum(Split, "split"))


class TrainingRun(Base):
    __tablename__ = "training_runs"
    __table_args__ = (Index("ix_training_runs_created_at", "created_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    status: Mapped[RunStatus] = mapped_column(_enum(RunStatus, "run_status"))
    config: Mapped[dict[str, Any]] = mapped_column(default=dict)
    snapshot_id: Mapped[int | None] = mapped_column(ForeignKey("dataset_snapshots.id"))
    device: Mapped[str | None] = mapped_column(String(64))
    progress: Mapped[dict[str, Any]] = mapped_column(default=dict)  # epoch, loss history
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    error: Mapped[str | None] = mapped_column(Text)
    flow_run_id: Mapped[str | None] = mapped_column(String(64))
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


# --------------------------------------------------------------------------- registry


class ModelVersion(Base):
    """Immutable once inserted (enforced below); the manifest describes the artifact fully."""

    __tablename__ = "model_versions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version: Mapped[int] = mapped_column(Integer, unique=True)  # 1, 2, 3 ... as people say it
    architecture: Mapped[str] = mapped_column(String(64))
    classes: Mapped[list[Any]] = mapped_column()
    artifact_key: Mapped[str] = mapped_column(String(256))
    sha256: Mapped[str] = mapped_column(String(64))  # of the manifest, which lists file hashes
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    manifest: Mapped[dict[str, Any]] = mapped_column(default=dict)
    snapshot_id: Mapped[int | None] = mapped_column(ForeignKey("dataset_snapshots.id"))
    training_run_id: Mapped[int | None] = mapped_column(ForeignKey("training_runs.id"))
    parent_version_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id"))
    size_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    created_by: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ModelAlias(Base):
    __tablename__ = "model_aliases"

    alias: Mapped[str] = mapped_column(String(32), primary_key=True)  # champion / challenger
    version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id"))
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    updated_by: Mapped[str | None] = mapped_column(String(64))


class PromotionEvent(Base):
    """Append-only (enforced below): who moved which alias from what to what, and why."""

    __tablename__ = "promotion_events"
    __table_args__ = (Index("ix_promotion_events_created_at", "created_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    action: Mapped[PromotionAction] = mapped_column(_enum(PromotionAction, "promotion_action"))
    alias: Mapped[str] = mapped_column(String(32))
    from_version_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id"))
    to_version_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id"))
    actor_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"))
    actor: Mapped[str] = mapped_column(String(64))
    reason: Mapped[str] = mapped_column(Text)
    policy_verdict: Mapped[str | None] = mapped_column(String(32))
    evidence: Mapped[dict[str, Any]] = mapped_column(default=dict)
    evidence_sha256: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class AuditLog(Base):
    """Append-only record of every privileged action, allowed or refused."""

    __tablename__ = "audit_log"
    __table_args__ = (Index("ix_audit_log_created_at", "created_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    actor_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"))
    actor: Mapped[str | None] = mapped_column(String(64))
    action: Mapped[str] = mapped_column(String(64))
    target_type: Mapped[str | None] = mapped_column(String(64))
    target_id: Mapped[str | None] = mapped_column(String(64))
    outcome: Mapped[str] = mapped_column(String(16))  # ok / denied / error
    detail: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


# --------------------------------------------------------------------------- invariants


class ImmutableRowError(RuntimeError):
    pass


_APPEND_ONLY = (ModelVersion, PromotionEvent, AuditLog)


@event.listens_for(Session, "before_flush")
def _guard_append_only(session: Session, _ctx: object, _instances: object) -> None:
    """Registered versions, promotion events and audit rows never change or disappear."""
    for obj in session.dirty:
        if isinstance(obj, _APPEND_ONLY) and session.is_modified(obj, include_collections=False):
            raise ImmutableRowError(f"{type(obj).__name__} rows are immutable")
    for obj in session.deleted:
        if isinstance(obj, _APPEND_ONLY):
            raise ImmutableRowError(f"{type(obj).__name__} rows cannot be deleted")

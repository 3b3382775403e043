"""The tables (SQLAlchemy 2.0 typed ORM). Alembic in ``db/`` owns the DDL.

Every row of a project's work carries ``project_id``: images, predictions (feedback through its
prediction), review items (annotations through their image), dataset snapshots (members through
theirs), training runs, model versions, aliases and promotion events. Users, tokens and the
audit log belong to the installation. ``DEFAULT_PROJECT_ID`` (1, named ``default``) holds an
installation's data from before projects.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Float,
    ForeignKey,
    Index,
    Integer,
    PrimaryKeyConstraint,
    String,
    Text,
    UniqueConstraint,
    event,
    text,
)
from sqlalchemy.orm import Mapped, Session, mapped_column, relationship

from quarkflow_core.schema.base import (
    AnnotationSource,
    Base,
    PromotionAction,
    ReviewReason,
    ReviewState,
    Role,
    RunStatus,
    Split,
    TaskType,
    Verdict,
    enum_column,
    new_uuid,
    utcnow,
)

DEFAULT_PROJECT_ID = 1
DEFAULT_PROJECT = "default"


def project_fk() -> Any:
    """The ``project_id`` column of a project's row; rows written without one (an installation
    from before projects, a caller that names none) belong to the default project."""
    return mapped_column(
        ForeignKey("projects.id"), default=DEFAULT_PROJECT_ID, server_default=text("1"), index=True
    )


# --------------------------------------------------------------------------- projects


class Project(Base):
    """A model line: its task type and class list, images and datasets, versions, aliases and
    policy, review queue and Label Studio project."""

    __tablename__ = "projects"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)  # in paths: /projects/<name>
    title: Mapped[str | None] = mapped_column(String(128))
    task_type: Mapped[TaskType] = mapped_column(enum_column(TaskType, "task_type"))
    classes: Mapped[list[Any]] = mapped_column(default=list)
    policy: Mapped[dict[str, Any]] = mapped_column(default=dict)  # PolicyConfig overrides
    labelstudio_project_id: Mapped[int | None] = mapped_column(Integer)
    created_by: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ProjectGrant(Base):
    """A user's role in one project, in place of their installation-wide role there."""

    __tablename__ = "project_grants"
    __table_args__ = (PrimaryKeyConstraint("project_id", "user_id", name="pk_project_grants"),)

    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    role: Mapped[Role] = mapped_column(enum_column(Role, "role"))
    granted_by: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


# --------------------------------------------------------------------------- people


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    username: Mapped[str] = mapped_column(String(64), unique=True)
    display_name: Mapped[str | None] = mapped_column(String(128))
    role: Mapped[Role] = mapped_column(enum_column(Role, "role"))
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
    __table_args__ = (UniqueConstraint("project_id", "sha256", name="uq_images_project_sha256"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    project_id: Mapped[int] = project_fk()
    sha256: Mapped[str] = mapped_column(String(64))
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
    project_id: Mapped[int] = project_fk()
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id"), index=True)
    model_version_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id"))
    label: Mapped[str] = mapped_column(String(128))
    confidence: Mapped[float] = mapped_column(Float)  # calibrated
    topk: Mapped[list[Any]] = mapped_column(default=list)  # [{"label":..,"confidence":..}]
    # detection: [{"label", "score", "box": [x1, y1, x2, y2]}] in pixels; label/confidence
    # then summarise them (the top box's label and score)
    boxes: Mapped[list[Any] | None] = mapped_column()
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
    verdict: Mapped[Verdict] = mapped_column(enum_column(Verdict, "verdict"))
    true_label: Mapped[str | None] = mapped_column(String(128))
    comment: Mapped[str | None] = mapped_column(Text)
    # detection: the verdict per predicted box and the boxes drawn for missed objects
    # (quarkflow_core.detection.feedback)
    boxes: Mapped[list[Any] | None] = mapped_column()
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
    project_id: Mapped[int] = project_fk()
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id"), unique=True)
    prediction_id: Mapped[str | None] = mapped_column(ForeignKey("predictions.id"))
    reason: Mapped[ReviewReason] = mapped_column(enum_column(ReviewReason, "review_reason"))
    state: Mapped[ReviewState] = mapped_column(
        enum_column(ReviewState, "review_state"), default=ReviewState.OPEN
    )
    priority: Mapped[float] = mapped_column(Float, default=0.0)  # higher = sooner
    resolved_label: Mapped[str | None] = mapped_column(String(128))
    external_task_id: Mapped[str | None] = mapped_column(String(64))
    scored_version: Mapped[int | None] = mapped_column(Integer)
    scored_label: Mapped[str | None] = mapped_column(String(128))
    scored_confidence: Mapped[float | None] = mapped_column(Float)
    scored_topk: Mapped[list[Any] | None] = mapped_column()
    scored_boxes: Mapped[list[Any] | None] = mapped_column()  # detection
    resolved_boxes: Mapped[list[Any] | None] = mapped_column()  # detection: what people settled
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
    source: Mapped[AnnotationSource] = mapped_column(
        enum_column(AnnotationSource, "annotation_source")
    )
    annotator: Mapped[str | None] = mapped_column(String(128))
    user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"))
    external_id: Mapped[str | None] = mapped_column(String(128))  # idempotency key
    external_task_id: Mapped[str | None] = mapped_column(String(64))
    boxes: Mapped[list[Any] | None] = mapped_column()  # detection: the annotator's boxes
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


# --------------------------------------------------------------------------- datasets & training


class DatasetSnapshot(Base):
    __tablename__ = "dataset_snapshots"
    __table_args__ = (
        UniqueConstraint("project_id", "content_hash", name="uq_dataset_snapshots_project_hash"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    project_id: Mapped[int] = project_fk()
    name: Mapped[str] = mapped_column(String(128))
    content_hash: Mapped[str] = mapped_column(String(64))
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
    split: Mapped[Split] = mapped_column(enum_column(Split, "split"))
    boxes: Mapped[list[Any] | None] = mapped_column()  # detection: the ground truth


class TrainingRun(Base):
    __tablename__ = "training_runs"
    __table_args__ = (Index("ix_training_runs_created_at", "created_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    project_id: Mapped[int] = project_fk()
    status: Mapped[RunStatus] = mapped_column(enum_column(RunStatus, "run_status"))
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
    __table_args__ = (
        UniqueConstraint("project_id", "version", name="uq_model_versions_project_version"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    project_id: Mapped[int] = project_fk()
    version: Mapped[int] = mapped_column(Integer)  # 1, 2, 3 ... as people say it, per project
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
    __table_args__ = (PrimaryKeyConstraint("project_id", "alias", name="pk_model_aliases"),)

    project_id: Mapped[int] = mapped_column(
        ForeignKey("projects.id"), default=DEFAULT_PROJECT_ID, server_default=text("1")
    )
    alias: Mapped[str] = mapped_column(String(32))  # champion / challenger
    version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id"))
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    updated_by: Mapped[str | None] = mapped_column(String(64))


class PromotionEvent(Base):
    """Append-only (enforced below): who moved which alias from what to what, and why."""

    __tablename__ = "promotion_events"
    __table_args__ = (Index("ix_promotion_events_created_at", "created_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    project_id: Mapped[int] = project_fk()
    action: Mapped[PromotionAction] = mapped_column(
        enum_column(PromotionAction, "promotion_action")
    )
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


APPEND_ONLY = (ModelVersion, PromotionEvent, AuditLog)


@event.listens_for(Session, "before_flush")
def _guard_append_only(session: Session, _ctx: object, _instances: object) -> None:
    """Registered versions, promotion events and audit rows never change or disappear."""
    for obj in session.dirty:
        if isinstance(obj, APPEND_ONLY) and session.is_modified(obj, include_collections=False):
            raise ImmutableRowError(f"{type(obj).__name__} rows are immutable")
    for obj in session.deleted:
        if isinstance(obj, APPEND_ONLY):
            raise ImmutableRowError(f"{type(obj).__name__} rows cannot be deleted")

"""The review queue's round trip through Label Studio, and how an item is settled.

* **push**: open review items become Label Studio tasks (the image URL + the model's guess as
  a pre-annotation); the task id is stored on the item (state ``sent``), one commit per item,
  and tasks already in the project are matched by image hash first, so an item is never sent
  twice even after a crash between the two.
* **pull / webhook**: annotations become ``annotations`` rows (source ``label_studio``,
  idempotent on the annotation's id); then each touched image is **settled**
  (``queue.settle``): annotators' majority W; if the annotators tie, or a person's feedback
  named a different label than W, the item is ``disputed`` (and left out of training) until
  someone resolves it; otherwise it is ``resolved`` with W, the image's training label.
* **resolve / dismiss** by an analyst or ML lead (audited, and final); they do not commit: the
  caller (route, page) does, so the item and its audit row land together.

Push and ``sync`` commit by design (see ``quarkflow_core.database``): a task id is committed as
soon as the task exists in Label Studio, and a sync is committed when it returns.

Projects: every function takes ``project_id`` (default: the default project) and touches only
that project's items and images. Each project has its own Label Studio project (``ls_title``;
its id is kept in ``Project.labelstudio_project_id``), and a webhook's Label Studio project
names ours (``project_for_labelstudio``).
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from quarkflow_core.errors import InvalidInput, NotFound
from quarkflow_core.labelstudio import LabelStudio, Project, PulledAnnotation, TaskSpec
from quarkflow_core.queue import settle
from quarkflow_core.schema import (
    DEFAULT_PROJECT_ID,
    Annotation,
    AnnotationSource,
    Image,
    ModelVersion,
    Prediction,
    ReviewItem,
    ReviewReason,
    ReviewState,
    Role,
    User,
)
from quarkflow_core.schema import Project as ProjectRow
from quarkflow_core.users import authorize, record_audit

PUSHABLE = (ReviewState.OPEN,)


# --------------------------------------------------------------------------- image URLs


def sign_image(secret: str, sha256: str, expires: int) -> str:
    return hmac.new(secret.encode(), f"{sha256}:{expires}".encode(), hashlib.sha256).hexdigest()


def signed_image_url(base_url: str, secret: str, sha256: str, ttl_s: int = 30 * 86400) -> str:
    """A URL of the Quarkflow API that serves the image without a token until it expires."""
    expires = int(time.time()) + ttl_s
    sig = sign_image(secret, sha256, expires)
    return f"{base_url.rstrip('/')}/api/v1/images/{sha256}?expires={expires}&sig={sig}"


def check_image_signature(secret: str, sha256: str, expires: int, sig: str) -> None:
    if expires < time.time():
        raise InvalidInput("this image link has expired", code="link_expired")
    if not hmac.compare_digest(sign_image(secret, sha256, expires).encode(), sig.encode()):
        raise InvalidInput("this image link is not valid", code="bad_signature")


def gcs_image_url(storage_url: str, image: Image) -> str:
    """``gs://bucket/prefix/<key>`` for Label Studio's GCS import storage to resolve."""
    return f"{storage_url.rstrip('/')}/{image.storage_key}"


# --------------------------------------------------------------------------- push


def _scored(boxes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: b[k] for k in ("label", "box", "score") if k in b} for b in boxes]


def push_review_items(
    *,
    session: Session,
    studio: LabelStudio,
    project: Project,
    image_url: Callable[[Image], str],
    limit: int = 500,
    project_id: int = DEFAULT_PROJECT_ID,
) -> dict[str, int]:
    """Send the project's open review items to its Label Studio ``project`` (most urgent
    first)."""
    rows = session.execute(
        select(ReviewItem, Image)
        .join(Image, Image.id == ReviewItem.image_id)
        .where(
            ReviewItem.project_id == project_id,
            ReviewItem.state.in_(PUSHABLE),
            ReviewItem.external_task_id.is_(None),
        )
        .order_by(ReviewItem.priority.desc(), ReviewItem.id)
        .limit(limit)
    ).all()
    if not rows:
        return {"pushed": 0, "recovered": 0}
    existing = studio.existing_tasks(project)
    pushed = recovered = 0
    for item, image in rows:
        task_id = existing.get(image.sha256)
        if task_id is None:
            pred = session.get(Prediction, item.prediction_id) if item.prediction_id else None
            version = (
                session.get(ModelVersion, pred.model_version_id)
                if pred and pred.model_version_id
                else None
            )
            task_id = studio.create_task(
                project,
                TaskSpec(
                    image_sha256=image.sha256,
                    image_url=image_url(image),
                    predicted_label=pred.label if pred else None,
                    score=pred.confidence if pred else None,
                    model_version=f"v{version.version}" if version else None,
                    # a detection: one pre-annotation with every box the model logged
                    boxes=_scored(pred.boxes) if pred and pred.boxes is not None else None,
                    width=image.width,
                    height=image.height,
                ),
            )
            pushed += 1
        else:
            recovered += 1
        item.external_task_id = str(task_id)
        item.state = ReviewState.SENT
        session.commit()
    return {"pushed": pushed, "recovered": recovered}


# --------------------------------------------------------------------------- pull


def record_annotations(
    *, session: Session, pulled: list[PulledAnnotation], project_id: int = DEFAULT_PROJECT_ID
) -> dict[str, Any]:
    """Store annotations of the project's images (idempotent) and settle every image they
    touch (queue.settle). An image the project does not have counts as unknown."""
    created = updated = unknown = 0
    touched: set[int] = set()
    for p in pulled:
        image = session.scalar(
            select(Image).where(Image.project_id == project_id, Image.sha256 == p.image_sha256)
        )
        if image is None:
            unknown += 1
            continue
        row = session.scalar(
            select(Annotation).where(
                Annotation.source == AnnotationSource.LABEL_STUDIO,
                Annotation.external_id == p.external_id,
            )
        )
        if row is not None and session.get(Image, row.image_id).project_id != project_id:
            unknown += 1  # recorded in another project: never moved or relabelled from here
            continue
        if row is None:
            session.add(
                Annotation(
                    image_id=image.id,
                    label=p.label,
                    source=AnnotationSource.LABEL_STUDIO,
                    annotator=p.annotator,
                    external_id=p.external_id,
                    external_task_id=str(p.task_id),
                    boxes=p.boxes,
                )
            )
            created += 1
        elif row.label != p.label or row.boxes != p.boxes:  # the annotator changed their answer
            row.label, row.boxes = p.label, p.boxes
            updated += 1
        else:
            continue
        touched.add(image.id)
    session.flush()
    states = Counter(
        settle(session, image_id=i, project_id=project_id).value for i in sorted(touched)
    )
    return {"created": created, "updated": updated, "unknown_images": unknown, **states}


def sync(
    *,
    session: Session,
    studio: LabelStudio,
    project: Project,
    image_url: Callable[[Image], str],
    project_id: int = DEFAULT_PROJECT_ID,
) -> dict[str, Any]:
    """Push the project's open items to its Label Studio ``project``, then pull every
    annotation of it: the periodic fallback for webhooks. Commits (push commits per item)."""
    pushed = push_review_items(
        session=session, studio=studio, project=project, image_url=image_url, project_id=project_id
    )
    pulled = record_annotations(
        session=session, pulled=studio.annotations(project), project_id=project_id
    )
    session.commit()
    return {"push": pushed, "pull": pulled}


# --------------------------------------------------------------------------- people


def get_item(*, session: Session, item_id: int, project_id: int = DEFAULT_PROJECT_ID) -> ReviewItem:
    """A review item of the project; another project's item is NotFound like an unknown id."""
    item = session.get(ReviewItem, item_id)
    if item is None or item.project_id != project_id:
        raise NotFound(f"no review item {item_id}")
    return item


def _decide(
    session: Session, *, item_id: int, user: User, action: str, project_id: int
) -> ReviewItem:
    """The checks every decision on an item shares: role analyst or ml_lead (in the project),
    the item exists in the project."""
    allowed = {Role.ANALYST, Role.ML_LEAD}
    authorize(session, actor=user, allowed=allowed, action=action, project_id=project_id)
    return get_item(session=session, item_id=item_id, project_id=project_id)


def resolve_item(
    *,
    session: Session,
    item_id: int,
    label: str,
    user: User,
    classes: list[str],
    project_id: int = DEFAULT_PROJECT_ID,
):
    """An analyst or ML lead settles an item (disputed or not) with a label."""
    item = _decide(
        session, item_id=item_id, user=user, action="review.resolve", project_id=project_id
    )
    if label not in classes:
        raise InvalidInput(f"unknown label {label!r}; valid labels: {', '.join(classes)}")
    item.state, item.resolved_label = ReviewState.RESOLVED, label
    item.decided_by_id, item.note = user.id, f"resolved by {user.username}"
    record_audit(
        session=session,
        actor=user,
        action="review.resolve",
        outcome="ok",
        target_type="review_item",
        target_id=item_id,
        detail={"label": label, "project_id": project_id},
    )
    session.flush()
    return item


def dismiss_as_noise(
    *, session: Session, item_id: int, user: User, project_id: int = DEFAULT_PROJECT_ID
):
    """Mark an item as label noise: it is left out of training."""
    item = _decide(
        session, item_id=item_id, user=user, action="review.dismiss", project_id=project_id
    )
    item.state, item.reason, item.resolved_label = (
        ReviewState.DISMISSED,
        ReviewReason.LABEL_NOISE,
        None,
    )
    item.decided_by_id, item.note = user.id, f"dismissed as label noise by {user.username}"
    record_audit(
        session=session,
        actor=user,
        action="review.dismiss",
        outcome="ok",
        target_type="review_item",
        target_id=item_id,
        detail={"project_id": project_id},
    )
    session.flush()
    return item


# --------------------------------------------------------------------------- wiring


def studio_from_settings(settings: Any) -> LabelStudio:
    token = settings.labelstudio_token.get_secret_value() if settings.labelstudio_token else ""
    if not token:
        raise InvalidInput("QF_LABELSTUDIO_TOKEN is not set: the Label Studio API token")
    return LabelStudio(settings.labelstudio_url, token)


def webhook_secret(settings: Any) -> str:
    """The shared secret Label Studio sends with each webhook (derived from QF_SECRET_KEY)."""
    key = settings.secret_key.get_secret_value().encode()
    return hmac.new(key, b"labelstudio-webhook", hashlib.sha256).hexdigest()[:32]


def image_url_builder(settings: Any) -> Callable[[Image], str]:
    """gs:// URLs (resolved by Label Studio's GCS storage) when storage is GCS, else signed
    links to the Quarkflow API."""
    if settings.storage_url.startswith("gs://"):
        return lambda image: gcs_image_url(settings.storage_url, image)
    base = settings.public_api_url or settings.api_url or "http://127.0.0.1:8000"
    secret = settings.secret_key.get_secret_value()
    return lambda image: signed_image_url(base, secret, image.sha256)


def project_classes(*, session: Session, project_id: int = DEFAULT_PROJECT_ID) -> list[str]:
    """The project's labels: its own class list, else its champion's, else its seed
    snapshot's."""
    from quarkflow_core import registry
    from quarkflow_core.labels import seed_snapshot
    from quarkflow_core.projects import get_project

    own = get_project(session=session, ref=project_id).classes
    if own:
        return list(own)
    champ = registry.alias_of(session=session, alias=registry.CHAMPION, project_id=project_id)
    if champ is not None:
        return list(champ.classes)
    return list(seed_snapshot(session=session, project_id=project_id).classes)


LS_TITLE_MAX = 50  # Label Studio refuses longer project titles


def ls_title(settings: Any, project: Any) -> str:
    """The title of a project's Label Studio project: ``QF_LABELSTUDIO_PROJECT`` for the default
    project (as before projects), ``"<that> · <project name>"`` for the others."""
    if project.id == DEFAULT_PROJECT_ID:
        return settings.labelstudio_project
    return f"{settings.labelstudio_project} · {project.name}"


def project_for_labelstudio(
    session: Session, ls_project_id: int | None, *, title: str | None = None, settings: Any = None
) -> int:
    """Our project for a Label Studio project (a webhook's, see ``labelstudio.webhook_project``):
    the one that recorded its id (``Project.labelstudio_project_id``), else the one whose
    ``ls_title`` is its ``title``. One nobody recorded yet is the default project's, as before
    projects, while the default project has recorded none; a payload that names no project is
    the default project's too. Any other Label Studio project is NotFound."""
    if ls_project_id is None:
        return DEFAULT_PROJECT_ID
    where = ProjectRow.labelstudio_project_id == int(ls_project_id)
    found = session.scalar(select(ProjectRow.id).where(where).order_by(ProjectRow.id))
    if found is not None:
        return int(found)
    rows = session.scalars(select(ProjectRow).order_by(ProjectRow.id)).all()
    if title is not None and settings is not None:
        for row in rows:
            if ls_title(settings, row) == title:
                return row.id
    if any(row.id == DEFAULT_PROJECT_ID and row.labelstudio_project_id is None for row in rows):
        return DEFAULT_PROJECT_ID
    raise NotFound(f"no project has Label Studio project {ls_project_id} ({title or 'untitled'})")


def sync_from_settings(
    *, session: Session, settings: Any, project_id: int = DEFAULT_PROJECT_ID
) -> dict[str, Any]:
    """One sync round of a project with the configured Label Studio (the labelstudio_sync
    flow's body): its Label Studio project (``ls_title``) is found or created, recorded on the
    project, then synced."""
    from quarkflow_core.projects import get_project

    row = get_project(session=session, ref=project_id)
    studio = studio_from_settings(settings)
    classes = project_classes(session=session, project_id=project_id)
    project = studio.ensure_project(ls_title(settings, row), classes, task_type=row.task_type.value)
    if row.labelstudio_project_id != project.id:
        row.labelstudio_project_id = project.id  # committed with the sync, by design
        session.flush()
    if settings.storage_url.startswith("gs://"):
        bucket, _, prefix = settings.storage_url.removeprefix("gs://").partition("/")
        studio.ensure_gcs_source(
            project, bucket, prefix, emulator=bool(settings.storage_emulator_host)
        )
    result = sync(
        session=session,
        studio=studio,
        project=project,
        image_url=image_url_builder(settings),
        project_id=project_id,
    )
    return {"project_id": project.id, **result}

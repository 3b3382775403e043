"""Predictions, feedback and the review queue in the database.

The service writes records to the outbox first; ``apply_records`` turns them into rows
(idempotently: a replayed record changes nothing). Readers (API, workbench) use the query
functions here. Every record and query belongs to one project (``project_id``; a record
without one, written before projects, belongs to the default project)."""

from __future__ import annotations

import uuid
from dataclasses import asdict
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import insert, select
from sqlalchemy.orm import Session

from quarkflow_core import queue
from quarkflow_core.errors import InvalidInput, NotFound
from quarkflow_core.images import ImageInfo, image_row, store_blob
from quarkflow_core.outbox import Record
from quarkflow_core.schema import (
    DEFAULT_PROJECT_ID,
    Feedback,
    Image,
    ModelVersion,
    Prediction,
    ReviewItem,
    ReviewState,
    Verdict,
    parse_enum,
)
from quarkflow_core.storage import Storage

PREDICTION, FEEDBACK = "prediction", "feedback"
OPEN_STATES = queue.QUEUE_STATES


def prediction_record(
    *,
    summary: dict[str, Any],
    info: ImageInfo,
    model_version: int | None,
    latency_ms: float,
    review_threshold: float,
    user_id: int | None = None,
    request_id: str | None = None,
    source: str = "api",
    project_id: int = DEFAULT_PROJECT_ID,
) -> dict[str, Any]:
    """The logged form of one prediction (outbox payload / batch record), with a new id."""
    return {
        "id": str(uuid.uuid4()),
        "project_id": project_id,
        "label": summary["label"],
        "confidence": summary["confidence"],
        "topk": summary["topk"],
        "margin": summary["margin"],
        "entropy": summary["entropy"],
        "model_version": model_version,
        "latency_ms": round(latency_ms, 3),
        "review": summary.get("review", summary["confidence"] < review_threshold),
        "review_threshold": round(review_threshold, 6),
        "request_id": request_id,
        "user_id": user_id,
        "source": source,
        "created_at": datetime.now(UTC).isoformat(),
        "image": asdict(info),
        **({"boxes": summary["boxes"]} if summary.get("boxes") is not None else {}),
    }


def feedback_record(
    *,
    prediction_id: str,
    predicted: str,
    verdict: Verdict,
    true_label: str | None,
    comment: str | None,
    classes: list[str],
    user_id: int | None = None,
    project_id: int = DEFAULT_PROJECT_ID,
) -> dict[str, Any]:
    """The logged form of a verdict on a prediction that said ``predicted``, checked: the
    label must be one of ``classes`` (the project's served model's; none: not checked)."""
    true_label = (true_label or "").strip() or None
    if true_label is not None and classes and true_label not in classes:
        raise InvalidInput(
            f"unknown label {true_label!r}; valid labels: {', '.join(classes)}",
            code="unknown_label",
        )
    if verdict == Verdict.CORRECT and true_label not in (None, predicted):
        raise InvalidInput(
            f"verdict 'correct' but true_label {true_label!r} differs from the predicted "
            f"{predicted!r}; send verdict 'wrong'",
        )
    if comment is not None and len(comment) > 2000:
        raise InvalidInput("comment too long: at most 2000 characters")
    if comment is not None and any(ord(c) < 32 and c not in "\t\n\r" for c in comment):
        raise InvalidInput("comment: must not contain NUL or other control characters")
    return {
        "id": str(uuid.uuid4()),
        "project_id": project_id,
        "prediction_id": prediction_id,
        "verdict": verdict.value,
        "true_label": predicted if verdict == Verdict.CORRECT else true_label,
        "comment": comment,
        "user_id": user_id,
        "created_at": datetime.now(UTC).isoformat(),
    }


def public_view(record: dict[str, Any]) -> dict[str, Any]:
    """What a caller is told about a prediction it just made."""
    keys = ("id", "label", "confidence", "topk", "model_version", "latency_ms", "review")
    out = {**{k: record[k] for k in keys}, "image_sha256": record["image"]["sha256"]}
    if "boxes" in record:
        out["boxes"] = record["boxes"]
        out["width"], out["height"] = record["image"]["width"], record["image"]["height"]
    return out


def parse_verdict(value: str) -> Verdict:
    return parse_enum(Verdict, value, "verdict")


def _apply_feedback(session: Session, record: Record) -> None:
    f = record.payload
    if session.get(Feedback, f["id"]) is not None:
        return
    pred = get_prediction(
        session=session,
        prediction_id=f["prediction_id"],
        project_id=int(f.get("project_id", DEFAULT_PROJECT_ID)),
    )
    if pred is None:  # unknown, or another project's
        raise NotFound(f"feedback {f['id']} refers to unknown prediction {f['prediction_id']}")
    verdict = Verdict(f["verdict"])
    session.add(
        Feedback(
            id=f["id"],
            prediction_id=pred.id,
            user_id=f.get("user_id"),
            verdict=verdict,
            true_label=f.get("true_label"),
            comment=f.get("comment"),
            boxes=f.get("boxes"),
            created_at=datetime.fromisoformat(f["created_at"]),
        )
    )
    session.flush()
    queue.settle(session, image_id=pred.image_id, prediction_id=pred.id, project_id=pred.project_id)


def store_blobs(storage: Storage, records: list[Record]) -> int:
    """Write the image of every prediction record at its content address (create-only, so a
    repeat changes nothing, and an object lost from storage is written again). The flusher calls
    this *before* it takes the database's write lock, so slow object storage never holds that
    lock. Returns how many objects were newly written."""
    infos = {}
    for record in records:
        if record.kind == PREDICTION and record.blob is not None:
            info = ImageInfo(**record.payload["image"])
            infos.setdefault(info.sha256, (info, record.blob))
    return sum(store_blob(storage, blob, info) for info, blob in infos.values())


def _apply_predictions(
    session: Session, storage: Storage, records: list[Record], *, blobs_stored: bool
) -> None:
    """Many prediction records in a handful of statements, whatever their number: the ids
    already logged, the images known, the model versions and the review items each read with
    one query; new images, predictions and review items each written with one batched INSERT
    (changed items in one flush). Idempotent: a record already logged (a replay after a crash
    between the commit and the outbox's delete) is skipped."""
    ids = [r.payload["id"] for r in records]
    logged = set(session.scalars(select(Prediction.id).where(Prediction.id.in_(ids))))
    todo: list[tuple[Record, int, ImageInfo]] = []
    for record in records:
        pid = record.payload["id"]
        if pid in logged:
            continue
        logged.add(pid)  # the same record twice in one batch: once
        project_id = int(record.payload.get("project_id", DEFAULT_PROJECT_ID))
        todo.append((record, project_id, ImageInfo(**record.payload["image"])))
    if not todo:
        return
    shas = {info.sha256 for _, _, info in todo}
    projects = {project_id for _, project_id, _ in todo}
    images = {
        (row.project_id, row.sha256): row
        for row in session.scalars(
            select(Image).where(Image.sha256.in_(shas), Image.project_id.in_(projects))
        )
    }
    new: dict[tuple[int, str], dict[str, Any]] = {}
    for record, project_id, info in todo:
        if (project_id, info.sha256) not in images and (project_id, info.sha256) not in new:
            if not blobs_stored:
                store_blob(storage, record.blob or b"", info)
            row = image_row(info, source=record.payload.get("source", "api"), project_id=project_id)
            new[(project_id, info.sha256)] = {
                c.key: getattr(row, c.key)
                for c in Image.__table__.columns
                if c.key not in ("id", "created_at")
            }
    if new:  # one batched INSERT, then their ids (RETURNING would be row by row on SQLite)
        session.execute(insert(Image), list(new.values()))
        shas = {sha for _, sha in new}
        for row in session.scalars(
            select(Image).where(Image.sha256.in_(shas), Image.project_id.in_(projects))
        ):
            images[(row.project_id, row.sha256)] = row
    numbers = {r.payload.get("model_version") for r, _, _ in todo} - {None}
    versions = {
        (project_id, number): vid
        for vid, project_id, number in session.execute(
            select(ModelVersion.id, ModelVersion.project_id, ModelVersion.version).where(
                ModelVersion.project_id.in_(projects), ModelVersion.version.in_(numbers)
            )
        )
    }
    observed: dict[int, list[tuple[int, str | None, queue.Score]]] = {}
    for record, project_id, info in todo:
        p = record.payload
        image = images[(project_id, info.sha256)]
        session.add(
            Prediction(
                id=p["id"],
                project_id=project_id,
                image_id=image.id,
                model_version_id=versions.get((project_id, p.get("model_version"))),
                label=p["label"],
                confidence=p["confidence"],
                topk=p["topk"],
                boxes=p.get("boxes"),
                latency_ms=p["latency_ms"],
                request_id=p.get("request_id"),
                user_id=p.get("user_id"),
                created_at=datetime.fromisoformat(p["created_at"]),
            )
        )
        score = queue.Score(
            version=p.get("model_version"),
            label=p["label"],
            confidence=p["confidence"],
            topk=p["topk"],
            margin=p["margin"],
            entropy=p["entropy"],
            unsure=bool(p.get("review")),
            threshold=p.get("review_threshold"),
            boxes=p.get("boxes"),
        )
        observed.setdefault(project_id, []).append((image.id, p["id"], score))
    session.flush()  # the predictions, before the items that point at them
    for project_id, observations in observed.items():
        queue.observe_many(session, observations, project_id=project_id)


def apply_records(
    session: Session, storage: Storage, records: list[Record], *, blobs_stored: bool = False
) -> None:
    """Write outbox records in the caller's transaction: each image first (unless the caller
    did it already with ``store_blobs``), then the rows. Consecutive prediction records are
    written together (``_apply_predictions``: a few statements per batch, not several per
    prediction); feedback one by one, in order, so that feedback on a prediction of the same
    batch finds it."""
    run: list[Record] = []
    for record in [*records, None]:
        if record is not None and record.kind == PREDICTION:
            run.append(record)
            continue
        if run:
            _apply_predictions(session, storage, run, blobs_stored=blobs_stored)
            run = []
        if record is None:
            break
        if record.kind == FEEDBACK:
            _apply_feedback(session, record)
        else:
            raise InvalidInput(f"unknown outbox record kind {record.kind!r}")


# --------------------------------------------------------------------------- reading


def prediction_dict(session: Session, pred: Prediction) -> dict[str, Any]:
    version = session.get(ModelVersion, pred.model_version_id) if pred.model_version_id else None
    feedback = session.scalars(
        select(Feedback).where(Feedback.prediction_id == pred.id).order_by(Feedback.created_at)
    ).all()
    review = session.scalar(select(ReviewItem).where(ReviewItem.image_id == pred.image_id))
    return {
        "id": pred.id,
        "label": pred.label,
        "confidence": pred.confidence,
        "topk": pred.topk,
        "model_version": version.version if version else None,
        "latency_ms": pred.latency_ms,
        "created_at": pred.created_at.isoformat(),
        "image_sha256": pred.image.sha256,
        **(
            {"boxes": pred.boxes, "width": pred.image.width, "height": pred.image.height}
            if pred.boxes is not None
            else {}
        ),
        "logged": True,
        "feedback": [
            {
                "id": f.id,
                "verdict": f.verdict.value,
                "true_label": f.true_label,
                "comment": f.comment,
                **({"boxes": f.boxes} if f.boxes is not None else {}),
                "created_at": f.created_at.isoformat(),
            }
            for f in feedback
        ],
        "review": None
        if review is None
        else {"state": review.state.value, "reason": review.reason.value},
    }


def pending_dict(p: dict[str, Any]) -> dict[str, Any]:
    """A prediction acknowledged but still in the outbox, as ``prediction_dict`` shows one."""
    return {
        **{k: p[k] for k in ("id", "label", "confidence", "topk", "model_version")},
        "latency_ms": p["latency_ms"],
        "created_at": p["created_at"],
        "image_sha256": p["image"]["sha256"],
        **(
            {"boxes": p["boxes"], "width": p["image"]["width"], "height": p["image"]["height"]}
            if "boxes" in p
            else {}
        ),
        "logged": False,  # acknowledged, still in the outbox
        "feedback": [],
        "review": {"state": "pending", "reason": "low_confidence"} if p["review"] else None,
    }


def get_prediction(
    *, session: Session, prediction_id: str, project_id: int = DEFAULT_PROJECT_ID
) -> Prediction | None:
    """A project's prediction; None for an unknown id and for another project's."""
    pred = session.get(Prediction, prediction_id)
    return pred if pred is not None and pred.project_id == project_id else None


def latest_prediction(
    *, session: Session, image_sha256: str, project_id: int = DEFAULT_PROJECT_ID
) -> Prediction:
    """The newest logged prediction of a project's image (by content hash)."""
    pred = session.scalar(
        select(Prediction)
        .join(Image, Image.id == Prediction.image_id)
        .where(Image.project_id == project_id, Image.sha256 == image_sha256)
        .order_by(Prediction.created_at.desc(), Prediction.id)
        .limit(1)
    )
    if pred is None:
        raise NotFound(f"no logged prediction of an image with sha256 {image_sha256}")
    return pred


def review_queue(
    *,
    session: Session,
    states: tuple[ReviewState, ...] = OPEN_STATES,
    limit: int = 50,
    offset: int = 0,
    strategy: str = "uncertainty",
    project_id: int = DEFAULT_PROJECT_ID,
) -> tuple[int, list[dict[str, Any]]]:
    """(total, page) of a project's review items. The work queue (the default states) comes in
    the order ``queue.order`` gives under ``strategy``; any other set of states, newest change
    first."""
    total = queue.queue_size(session, states, project_id=project_id)
    if tuple(states) == tuple(OPEN_STATES):
        ordered = queue.order(
            session, strategy=strategy, limit=offset + limit, project_id=project_id
        )
        ids = ordered[offset:]
        ordering = None
    else:
        ids, ordering = None, (ReviewItem.updated_at.desc(), ReviewItem.id)
    query = (
        select(ReviewItem, Image, Prediction)
        .join(Image, Image.id == ReviewItem.image_id)
        .outerjoin(Prediction, Prediction.id == ReviewItem.prediction_id)
    )
    if ids is not None:
        query = query.where(ReviewItem.project_id == project_id, ReviewItem.id.in_(ids))
        found = {row[0].id: row for row in session.execute(query)}
        rows = [found[i] for i in ids if i in found]
    else:
        query = query.where(
            ReviewItem.project_id == project_id, ReviewItem.state.in_(states)
        ).order_by(*ordering)
        rows = session.execute(query.limit(limit).offset(offset)).all()
    page = [
        {
            "id": item.id,
            "image_sha256": image.sha256,
            "storage_key": image.storage_key,
            "prediction_id": item.prediction_id,
            "predicted_label": item.scored_label or (pred.label if pred else None),
            "confidence": item.scored_confidence
            if item.scored_confidence is not None
            else (pred.confidence if pred else None),
            "scored_by": item.scored_version,
            "reason": item.reason.value,
            "state": item.state.value,
            "priority": item.priority,
            "note": item.note,
            "resolved_label": item.resolved_label,
            "created_at": item.created_at.isoformat(),
            "expert_label": None,
            **(
                {
                    "boxes": item.scored_boxes
                    if item.scored_boxes is not None
                    else (pred.boxes if pred else None),
                    "resolved_boxes": item.resolved_boxes,
                    "width": image.width,
                    "height": image.height,
                }
                if item.scored_boxes is not None or (pred is not None and pred.boxes is not None)
                else {}
            ),
        }
        for item, image, pred in rows
    ]
    # What experts said the image is ("wrong, it is X"), latest first: the reviewer's hint.
    by_image = {image.id: row for (_, image, _), row in zip(rows, page, strict=True)}
    said = session.execute(
        select(Prediction.image_id, Feedback.true_label)
        .join(Feedback, Feedback.prediction_id == Prediction.id)
        .where(
            Prediction.image_id.in_(list(by_image)),
            Feedback.verdict == Verdict.WRONG,
            Feedback.true_label.is_not(None),
        )
        .order_by(Feedback.created_at)
    ).all()
    for image_id, label in said:
        by_image[image_id]["expert_label"] = label
    return int(total), page

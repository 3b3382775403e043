"""Opening, scoring, settling and re-scoring review items (the rules listed in
``quarkflow_core.queue``). Every function takes ``project_id`` and touches only that project's
items."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from sqlalchemy import insert, or_, select
from sqlalchemy.orm import Session

from quarkflow_core.schema import (
    DEFAULT_PROJECT_ID,
    Annotation,
    AnnotationSource,
    Feedback,
    Image,
    Prediction,
    ReviewItem,
    ReviewReason,
    ReviewState,
    Verdict,
)

QUEUE_STATES = (ReviewState.OPEN, ReviewState.SENT, ReviewState.DISPUTED)  # work to do
UNANSWERED = (ReviewReason.LOW_CONFIDENCE, ReviewReason.SAMPLED)  # no person has spoken
RESCORED_STATES = (ReviewState.OPEN, ReviewState.SENT, ReviewState.CLOSED)
STRATEGIES = ("uncertainty", "diverse")
DIVERSE_POOL = 250  # the diverse strategy picks from this many of the most uncertain items


def uncertainty(*, margin: float, entropy: float) -> float:
    """In [0, 1]: small top-2 margin and high (normalised) entropy."""
    return 0.5 * (1.0 - margin) + 0.5 * entropy


def review_priority(*, margin: float, entropy: float, disputed: bool = False) -> float:
    """Higher = reviewed sooner; anything a person called wrong comes before anything merely
    uncertain."""
    return round((1.0 if disputed else 0.0) + uncertainty(margin=margin, entropy=entropy), 6)


def feedback_label(verdict: Verdict, true_label: str | None, predicted: str) -> str | None:
    """The label a piece of feedback asserts: "correct" confirms the prediction, "wrong"
    gives the true label (or none)."""
    return predicted if verdict == Verdict.CORRECT else true_label


@dataclass(frozen=True)
class Score:
    """What one model said about one image, and whether that calls for a person."""

    version: int | None
    label: str
    confidence: float
    topk: list[dict[str, Any]]
    margin: float
    entropy: float
    unsure: bool  # below the review threshold
    threshold: float | None = None
    boxes: list[dict[str, Any]] | None = None  # detection: what the model found

    @classmethod
    def of(cls, summary: dict[str, Any], *, version: int | None, threshold: float) -> Score:
        keys = ("label", "confidence", "topk", "margin", "entropy")
        return cls(
            version=version,
            threshold=threshold,
            unsure=summary["confidence"] < threshold,
            **{k: summary[k] for k in keys},
        )


def _apply_score(item: ReviewItem, score: Score, *, prediction_id: str | None) -> None:
    item.scored_version, item.scored_label = score.version, score.label
    item.scored_confidence, item.scored_topk = score.confidence, score.topk
    item.scored_boxes = score.boxes
    if prediction_id is not None:
        item.prediction_id = prediction_id
    disputed = item.reason == ReviewReason.USER_DISPUTED or item.state == ReviewState.DISPUTED
    item.priority = review_priority(margin=score.margin, entropy=score.entropy, disputed=disputed)
    if item.reason not in UNANSWERED:
        return
    if item.state == ReviewState.OPEN and not score.unsure:
        item.state = ReviewState.CLOSED
        who = f"v{score.version}" if score.version is not None else "the model"
        bar = f" >= review threshold {score.threshold:.2f}" if score.threshold else ""
        item.note = f"{who} is now confident: {score.label} at {score.confidence:.2f}{bar}"
    elif item.state == ReviewState.CLOSED and score.unsure:
        item.state, item.note = ReviewState.OPEN, None


def items_of(project_id: int, states: Sequence[ReviewState] | None = None) -> list[Any]:
    """The where clause of the project's items (in ``states``)."""
    where: list[Any] = [ReviewItem.project_id == project_id]
    return where if states is None else [*where, ReviewItem.state.in_(states)]


def _item_of(session: Session, *, image_id: int, project_id: int) -> ReviewItem | None:
    where = (*items_of(project_id), ReviewItem.image_id == image_id)
    return session.scalar(select(ReviewItem).where(*where))


def observe(
    session: Session,
    *,
    image_id: int,
    prediction_id: str | None,
    score: Score,
    project_id: int = DEFAULT_PROJECT_ID,
) -> ReviewItem | None:
    """A new prediction of a project's image: open an item when the model is unsure, otherwise
    re-score (and possibly close) the image's existing item. Settled items keep their state."""
    item = _item_of(session, image_id=image_id, project_id=project_id)
    if item is None:
        if not score.unsure:
            return None
        reason, state = ReviewReason.LOW_CONFIDENCE, ReviewState.OPEN
        item = ReviewItem(project_id=project_id, image_id=image_id, reason=reason, state=state)
        session.add(item)
    if item.state in (*RESCORED_STATES, ReviewState.DISPUTED):
        _apply_score(item, score, prediction_id=prediction_id)
    session.flush()
    return item


def observe_many(
    session: Session,
    observations: Sequence[tuple[int, str | None, Score]],
    *,
    project_id: int = DEFAULT_PROJECT_ID,
) -> None:
    """``observe`` for many new predictions of a project's images at once, in order
    (``(image_id, prediction_id, score)`` each; the same image may come more than once): one
    query for the images' items, one batched INSERT for the new ones, and the changed ones
    updated in the session's next flush (the outbox flusher's batches)."""
    if not observations:
        return
    image_ids = {image_id for image_id, _, _ in observations}
    items = {
        item.image_id: item
        for item in session.scalars(
            select(ReviewItem).where(*items_of(project_id), ReviewItem.image_id.in_(image_ids))
        )
    }
    new: dict[int, ReviewItem] = {}  # built here, inserted together below
    for image_id, prediction_id, score in observations:
        item = items.get(image_id)
        if item is None:
            if not score.unsure:
                continue
            item = ReviewItem(
                project_id=project_id,
                image_id=image_id,
                reason=ReviewReason.LOW_CONFIDENCE,
                state=ReviewState.OPEN,
            )
            items[image_id] = new[image_id] = item
        if item.state in (*RESCORED_STATES, ReviewState.DISPUTED):
            _apply_score(item, score, prediction_id=prediction_id)
    if new:
        columns = [c.key for c in ReviewItem.__table__.columns if c.key not in _GENERATED]
        rows = [{key: getattr(item, key) for key in columns} for item in new.values()]
        session.execute(insert(ReviewItem), rows)


_GENERATED = ("id", "created_at", "updated_at")  # the database's or the column default's


def item_to_settle(
    session: Session, *, image_id: int, prediction_id: str | None, project_id: int
) -> ReviewItem:
    """The image's review item, opened (as sampled) when people spoke about an image the
    model was sure of."""
    item = _item_of(session, image_id=image_id, project_id=project_id)
    if item is None:
        item = ReviewItem(
            project_id=project_id,
            image_id=image_id,
            prediction_id=prediction_id,
            reason=ReviewReason.SAMPLED,
            state=ReviewState.OPEN,
            priority=0.0,
        )
        session.add(item)
    return item


def settle(
    session: Session,
    *,
    image_id: int,
    prediction_id: str | None = None,
    project_id: int = DEFAULT_PROJECT_ID,
) -> ReviewState:
    """Settle one of the project's images from what people said about it (module docstring);
    a detection project's from the boxes they gave (``detection.labels.settle_boxes``)."""
    from quarkflow_core.projects import is_detection

    if is_detection(session=session, project_id=project_id):
        from quarkflow_core.detection.labels import settle_boxes

        return settle_boxes(
            session, image_id=image_id, prediction_id=prediction_id, project_id=project_id
        )
    votes = Counter(
        session.scalars(
            select(Annotation.label).where(
                Annotation.image_id == image_id, Annotation.source == AnnotationSource.LABEL_STUDIO
            )
        )
    )
    said = session.execute(
        select(Feedback.verdict, Feedback.true_label, Prediction.label)
        .join(Prediction, Prediction.id == Feedback.prediction_id)
        .where(Prediction.image_id == image_id, Prediction.project_id == project_id)
    ).all()
    feedback_labels = {
        label for verdict, true, guess in said if (label := feedback_label(verdict, true, guess))
    }
    item = item_to_settle(
        session, image_id=image_id, prediction_id=prediction_id, project_id=project_id
    )
    if item.decided_by_id is not None or item.state == ReviewState.DISMISSED:
        return item.state  # an analyst's or ML lead's decision is final
    if votes:
        ranked = votes.most_common()
        tie = len(ranked) > 1 and ranked[0][1] == ranked[1][1]
        winner = None if tie else ranked[0][0]
        if winner is not None and feedback_labels - {winner}:
            winner = None  # a person named another label than the annotators
    elif feedback_labels:
        winner = next(iter(feedback_labels)) if len(feedback_labels) == 1 else None
    else:
        if said:  # "wrong" with no label: someone must say what it is
            item.reason = ReviewReason.USER_DISPUTED
            item.priority = max(item.priority, 1.0)
            if item.state in (ReviewState.CLOSED, ReviewState.RESOLVED):
                item.state = ReviewState.OPEN
            item.note = "called wrong without a label"
        session.flush()
        return item.state
    if winner is None:
        item.state, item.resolved_label = ReviewState.DISPUTED, None
        item.priority = max(item.priority, 1.0)
        item.note = "people disagree: " + ", ".join(sorted(feedback_labels | set(votes)))
    else:
        item.state, item.resolved_label = ReviewState.RESOLVED, winner
        sources = [n for n, v in (("feedback", feedback_labels), ("annotators", votes)) if v]
        item.note = f"settled by {' and '.join(sources)}"
    session.flush()
    return item.state


# --------------------------------------------------------------------------- re-scoring


def stale_items(
    session: Session,
    *,
    version: int | None,
    limit: int | None = None,
    project_id: int = DEFAULT_PROJECT_ID,
) -> list[int]:
    """Ids of the project's unanswered items not yet scored by ``version`` (most urgent first)."""
    query = (
        select(ReviewItem.id)
        .where(
            *items_of(project_id, RESCORED_STATES),
            ReviewItem.reason.in_(UNANSWERED),
            or_(ReviewItem.scored_version.is_(None), ReviewItem.scored_version != version),
        )
        .order_by(ReviewItem.priority.desc(), ReviewItem.id)
    )
    return list(session.scalars(query.limit(limit) if limit else query))


def detection_score(
    predictor: Any, image: Any, *, width: int, height: int, threshold: float
) -> Score:
    """What a detector says about a decoded image, as the queue scores it."""
    from quarkflow_core.detection.serving import detect_summary

    s = detect_summary(predictor, image, width=width, height=height, threshold=threshold)
    keys = ("label", "confidence", "topk", "margin", "entropy")
    return Score(
        version=predictor.version,
        threshold=threshold,
        unsure=s["review"],
        boxes=s["boxes"],
        **{k: s[k] for k in keys},
    )


def rescore(
    session: Session,
    *,
    storage: Any,
    predictor: Any,
    threshold: float,
    chunk: int = 128,
    on_progress: Callable[[int, int], None] | None = None,
    project_id: int = DEFAULT_PROJECT_ID,
) -> dict[str, int]:
    """Score every unanswered item of the project again with ``predictor`` (its champion): new
    priorities, items it is sure of closed, closed ones it is unsure of re-opened. Per chunk:
    the images are scored with no lock held, then the items are re-read under the write lock
    (an item a person answered meanwhile is left alone) and committed."""
    from quarkflow_core.database import begin_write
    from quarkflow_core.images import validate_upload
    from quarkflow_core.predictor import summarize

    ids = stale_items(session, version=predictor.version, project_id=project_id)
    session.commit()
    counts = Counter(rescored=0, closed=0, reopened=0, unreadable=0)
    k = min(5, len(predictor.classes))
    for start in range(0, len(ids), chunk):
        keys = session.execute(
            select(ReviewItem.id, Image.storage_key)
            .join(Image, Image.id == ReviewItem.image_id)
            .where(*items_of(project_id), ReviewItem.id.in_(ids[start : start + chunk]))
        ).all()
        session.commit()
        arrays, live = [], []
        scores = {}
        for item_id, key in keys:
            try:
                info, decoded = validate_upload(storage.get(key))
            except Exception:  # a blob that is gone or unreadable: leave the item as it is
                counts["unreadable"] += 1
                continue
            if getattr(predictor, "task", None) == "detection":
                scores[item_id] = detection_score(
                    predictor, decoded, width=info.width, height=info.height, threshold=threshold
                )
                continue
            arrays.append(predictor.preprocess_image(decoded))
            live.append(item_id)
        if live:
            probs = predictor.probabilities(np.stack(arrays))
            scores = {
                item_id: Score.of(
                    summarize(row, predictor.classes, k=k),
                    version=predictor.version,
                    threshold=threshold,
                )
                for item_id, row in zip(live, probs, strict=True)
            }
        begin_write(session)
        where = (*items_of(project_id), ReviewItem.id.in_(list(scores)))
        for item in session.scalars(select(ReviewItem).where(*where)):
            if item.state not in RESCORED_STATES or item.reason not in UNANSWERED:
                continue
            was_closed = item.state == ReviewState.CLOSED
            _apply_score(item, scores[item.id], prediction_id=None)
            is_closed = item.state == ReviewState.CLOSED
            counts["rescored"] += 1
            counts["closed"] += is_closed and not was_closed
            counts["reopened"] += was_closed and not is_closed
        session.commit()
        if on_progress:
            on_progress(min(start + chunk, len(ids)), len(ids))
    return dict(counts)

"""The review queue's rules: what opens an item, what settles or closes it, how urgent it is,
and which items a person sees next. One item per image.

* **Opened** by a prediction below the serving model's calibrated review threshold
  (``low_confidence``), or by a person's "wrong" without a label (``user_disputed``: it needs
  a label from someone).
* **Scored by the current champion**: every new prediction of an image re-scores its item
  (``scored_*``, ``priority``), and when the champion changes the open items are re-scored by
  the new one (``rescore``: the API does it after each swap, ``quarkflow review rescore`` on
  demand). An unanswered item the champion is now sure of **closes itself** (``closed``, with
  the reason in ``note``); it re-opens if a later model is unsure again.
* **Settled by people** (``settle``): the labels people gave (feedback: "correct" confirms the
  prediction, "wrong, it is X" names X; Label Studio annotators' majority) agree ->
  ``resolved`` with that label; they disagree with each other -> ``disputed`` until an analyst
  decides. An analyst's or ML lead's decision (resolve, dismiss as noise) is final.
* **Work to do** is ``open``, ``sent`` (to Label Studio) and ``disputed``: answered items leave
  the queue. The order: disputed items first (priority >= 1), then the champion's uncertainty,
  optionally spread for diversity and class balance (``QF_REVIEW_STRATEGY``, see ``order``).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from quarkflow_core.errors import InvalidInput
from quarkflow_core.schema import (
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


def observe(
    session: Session, *, image_id: int, prediction_id: str | None, score: Score
) -> ReviewItem | None:
    """A new prediction of an image: open an item when the model is unsure, otherwise re-score
    (and possibly close) the image's existing item. Settled items keep their state."""
    item = session.scalar(select(ReviewItem).where(ReviewItem.image_id == image_id))
    if item is None:
        if not score.unsure:
            return None
        item = ReviewItem(
            image_id=image_id, reason=ReviewReason.LOW_CONFIDENCE, state=ReviewState.OPEN
        )
        session.add(item)
    if item.state in (*RESCORED_STATES, ReviewState.DISPUTED):
        _apply_score(item, score, prediction_id=prediction_id)
    session.flush()
    return item


def settle(session: Session, *, image_id: int, prediction_id: str | None = None) -> ReviewState:
    """Settle one image from what people said about it (see the module docstring)."""
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
        .where(Prediction.image_id == image_id)
    ).all()
    feedback_labels = {
        label for verdict, true, guess in said if (label := feedback_label(verdict, true, guess))
    }
    item = session.scalar(select(ReviewItem).where(ReviewItem.image_id == image_id))
    if item is None:
        item = ReviewItem(
            image_id=image_id,
            prediction_id=prediction_id,
            reason=ReviewReason.SAMPLED,
            state=ReviewState.OPEN,
            priority=0.0,
        )
        session.add(item)
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


def stale_items(session: Session, *, version: int | None, limit: int | None = None) -> list[int]:
    """Ids of unanswered items not yet scored by ``version`` (most urgent first)."""
    query = (
        select(ReviewItem.id)
        .where(
            ReviewItem.state.in_(RESCORED_STATES),
            ReviewItem.reason.in_(UNANSWERED),
            or_(ReviewItem.scored_version.is_(None), ReviewItem.scored_version != version),
        )
        .order_by(ReviewItem.priority.desc(), ReviewItem.id)
    )
    return list(session.scalars(query.limit(limit) if limit else query))


def rescore(
    session: Session,
    *,
    storage: Any,
    predictor: Any,
    threshold: float,
    chunk: int = 128,
    on_progress: Callable[[int, int], None] | None = None,
) -> dict[str, int]:
    """Score every unanswered item again with ``predictor`` (the current champion): new
    priorities, items it is sure of closed, closed ones it is unsure of re-opened. Per chunk:
    the images are scored with no lock held, then the items are re-read under the write lock
    (an item a person answered meanwhile is left alone) and committed."""
    from quarkflow_core.database import begin_write
    from quarkflow_core.images import validate_upload
    from quarkflow_core.predictor import summarize

    ids = stale_items(session, version=predictor.version)
    session.commit()
    counts = Counter(rescored=0, closed=0, reopened=0, unreadable=0)
    k = min(5, len(predictor.classes))
    for start in range(0, len(ids), chunk):
        keys = session.execute(
            select(ReviewItem.id, Image.storage_key)
            .join(Image, Image.id == ReviewItem.image_id)
            .where(ReviewItem.id.in_(ids[start : start + chunk]))
        ).all()
        session.commit()
        arrays, live = [], []
        for item_id, key in keys:
            try:
                _, decoded = validate_upload(storage.get(key))
            except Exception:  # a blob that is gone or unreadable: leave the item as it is
                counts["unreadable"] += 1
                continue
            arrays.append(predictor.preprocess_image(decoded))
            live.append(item_id)
        scores = {}
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
        for item in session.scalars(select(ReviewItem).where(ReviewItem.id.in_(list(scores)))):
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


# --------------------------------------------------------------------------- what comes next


def check_strategy(name: str) -> str:
    if name not in STRATEGIES:
        raise InvalidInput(f"unknown review strategy {name!r}; valid: {', '.join(STRATEGIES)}")
    return name


def probability_vector(topk: Sequence[dict[str, Any]], classes: Sequence[str]) -> np.ndarray:
    """The model's output distribution rebuilt from its top-k (the rest of the mass spread
    evenly over the other classes): the space the diversity step measures distances in."""
    index = {c: i for i, c in enumerate(classes)}
    vec = np.zeros(len(classes))
    for entry in topk:
        if entry["label"] in index:
            vec[index[entry["label"]]] = entry["confidence"]
    rest = len(classes) - len(topk)
    if rest > 0:
        vec[vec == 0] = max(0.0, 1.0 - vec.sum()) / rest
    return vec


def diverse_order(
    priorities: Sequence[float], labels: Sequence[str], vectors: np.ndarray, k: int
) -> list[int]:
    """Batch-mode selection of ``k`` of the given items (indices, in the order to review):
    class-balanced round robin over the predicted labels, and inside a class the item with the
    largest uncertainty-weighted distance to everything chosen so far (weighted k-center), so a
    batch does not spend fifty answers on fifty near-identical cases."""
    n = len(priorities)
    k = min(k, n)
    if k == 0:
        return []
    u = np.asarray(priorities, dtype=float)
    by_label: dict[str, list[int]] = {}
    for i in np.argsort(-u, kind="stable"):
        by_label.setdefault(labels[i], []).append(int(i))
    rounds = sorted(by_label, key=lambda c: -u[by_label[c][0]])
    dist = np.full(n, np.inf)
    chosen: list[int] = []
    taken = np.zeros(n, dtype=bool)
    while len(chosen) < k:
        for label in rounds:
            pool = [i for i in by_label[label] if not taken[i]]
            if not pool or len(chosen) >= k:
                continue
            cand = np.array(pool)
            d = np.where(np.isinf(dist[cand]), 1.0, dist[cand])
            best = int(cand[np.argmax(u[cand] * (1e-6 + d))])
            chosen.append(best)
            taken[best] = True
            dist = np.minimum(dist, np.linalg.norm(vectors - vectors[best], axis=1) / math.sqrt(2))
    return chosen


def order(
    session: Session, *, strategy: str, limit: int, classes: Sequence[str] | None = None
) -> list[int]:
    """Ids of the next ``limit`` items of work, in order: disputed and user-disputed items
    first (they need a decision), then the open/sent items chosen by ``strategy``:
    ``uncertainty`` = the champion's most uncertain first; ``diverse`` = the ``DIVERSE_POOL``
    most uncertain, in class-balanced, spread-out order (``diverse_order``), then the rest by
    uncertainty. Either order for a small ``limit`` is a prefix of the order for a larger one,
    so paging through the queue never skips or repeats an item."""
    check_strategy(strategy)
    urgent = list(
        session.scalars(
            select(ReviewItem.id)
            .where(ReviewItem.state.in_(QUEUE_STATES), ReviewItem.priority >= 1.0)
            .order_by(ReviewItem.priority.desc(), ReviewItem.id)
            .limit(limit)
        )
    )
    rest = limit - len(urgent)
    if rest <= 0:
        return urgent
    pool_size = rest if strategy == "uncertainty" else max(rest, DIVERSE_POOL)
    pool = session.execute(
        select(
            ReviewItem.id,
            ReviewItem.priority,
            ReviewItem.scored_label,
            ReviewItem.scored_topk,
            Prediction.label,
            Prediction.topk,
        )
        .outerjoin(Prediction, Prediction.id == ReviewItem.prediction_id)
        .where(ReviewItem.state.in_(QUEUE_STATES), ReviewItem.priority < 1.0)
        .order_by(ReviewItem.priority.desc(), ReviewItem.id)
        .limit(pool_size)
    ).all()
    if strategy == "uncertainty" or len(pool) <= 1:
        return urgent + [row[0] for row in pool[:rest]]
    head = pool[:DIVERSE_POOL]
    labels = [row[2] or row[4] or "" for row in head]
    if classes is None:
        classes = sorted({e["label"] for row in head for e in (row[3] or row[5] or [])})
    vectors = np.stack([probability_vector(row[3] or row[5] or [], classes) for row in head])
    picked = diverse_order([row[1] for row in head], labels, vectors, min(rest, len(head)))
    chosen = set(picked)
    ids = [head[i][0] for i in picked] + [
        row[0] for i, row in enumerate(pool) if i not in chosen
    ]  # the pool's remainder (and anything past it) by uncertainty
    return urgent + ids[:rest]


def queue_size(session: Session, states: Sequence[ReviewState] = QUEUE_STATES) -> int:
    where = ReviewItem.state.in_(states)
    return int(session.scalar(select(func.count()).select_from(ReviewItem).where(where)) or 0)

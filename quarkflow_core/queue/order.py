"""Which items a person sees next: the work to do (open, sent, disputed), disputed first, then
the champion's uncertainty, optionally spread for diversity and class balance
(``QF_REVIEW_STRATEGY``). Per project, like the rules."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from quarkflow_core.errors import InvalidInput
from quarkflow_core.queue.rules import DIVERSE_POOL, QUEUE_STATES, STRATEGIES, items_of
from quarkflow_core.schema import DEFAULT_PROJECT_ID, Prediction, ReviewItem, ReviewState

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
    session: Session,
    *,
    strategy: str,
    limit: int,
    classes: Sequence[str] | None = None,
    project_id: int = DEFAULT_PROJECT_ID,
) -> list[int]:
    """Ids of the project's next ``limit`` items of work, in order: disputed and user-disputed
    items first (they need a decision), then the open/sent items chosen by ``strategy``:
    ``uncertainty`` = the champion's most uncertain first; ``diverse`` = the ``DIVERSE_POOL``
    most uncertain, in class-balanced, spread-out order (``diverse_order``), then the rest by
    uncertainty. Either order for a small ``limit`` is a prefix of the order for a larger one,
    so paging through the queue never skips or repeats an item."""
    check_strategy(strategy)
    urgent = list(
        session.scalars(
            select(ReviewItem.id)
            .where(*items_of(project_id, QUEUE_STATES), ReviewItem.priority >= 1.0)
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
        .where(*items_of(project_id, QUEUE_STATES), ReviewItem.priority < 1.0)
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


def queue_size(
    session: Session,
    states: Sequence[ReviewState] = QUEUE_STATES,
    *,
    project_id: int = DEFAULT_PROJECT_ID,
) -> int:
    """How many of the project's items are in ``states`` (default: the work to do)."""
    where = items_of(project_id, states)
    return int(session.scalar(select(func.count()).select_from(ReviewItem).where(*where)) or 0)

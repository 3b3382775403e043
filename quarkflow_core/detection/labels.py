"""Which boxes does each image of a detection project have for training? The detection
counterpart of ``quarkflow_core.labels`` and of the review queue's ``settle``.

Evidence per image, strongest first:

0. **A settled review item**: ``resolved`` gives its ``resolved_boxes``; ``disputed`` leaves the
   image out until a person settles it.
1. **Label Studio annotations** (each a list of boxes; zero boxes means "no objects").
2. **Expert feedback**: the boxes each answer implies (``detection.feedback.implied_truth``).
3. **Seed annotations**.

Two box lists *agree* when at least ``AGREE`` of the boxes match one-to-one with the same label
at IoU >= 0.5 (``detection.boxes.agreement``). Annotators must agree with each other, and any
usable feedback with them; with no annotation, all usable feedback must agree. The agreed list
is the newest annotator's (or expert's). Disagreement makes the image *disputed*.

The hold-out follows the classification rule: the seed snapshot's hold-out stays with its seed
boxes; of the other labelled images a share (``holdout_share``) goes to the hold-out, and an
image once trained on never moves there (stable, sha256 order)."""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from quarkflow_core.datasets import MemberSpec, create_snapshot
from quarkflow_core.detection.feedback import implied_truth
from quarkflow_core.detection.seed import box_summary
from quarkflow_core.errors import InvalidInput
from quarkflow_core.schema import (
    DEFAULT_PROJECT_ID,
    Annotation,
    AnnotationSource,
    DatasetMember,
    Feedback,
    Image,
    Prediction,
    ReviewItem,
    ReviewReason,
    ReviewState,
    Split,
)

AGREE = 0.8
IOU = 0.5


@dataclass
class Evidence:
    """What people said about one image's boxes (oldest first)."""

    annotations: list[list[dict[str, Any]]] = field(default_factory=list)
    feedback: list[list[dict[str, Any]] | None] = field(default_factory=list)  # None: unusable
    seed: list[dict[str, Any]] | None = None


def agree(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> bool:
    from quarkflow_core.detection.boxes import agreement

    return agreement(a, b, iou=IOU) >= AGREE


def consensus(evidence: Evidence) -> tuple[str, list[dict[str, Any]] | None, str]:
    """(outcome, boxes, note): outcome ``resolved`` (boxes agreed), ``disputed`` (people
    disagree), ``unclear`` (someone called it wrong without saying how) or ``none``."""
    usable = [f for f in evidence.feedback if f is not None]
    if evidence.annotations:
        lists = evidence.annotations
        base = lists[-1]
        if not all(agree(base, other) for other in lists[:-1]):
            return "disputed", None, f"{len(lists)} annotators disagree on the boxes"
        if not all(agree(base, f) for f in usable):
            return "disputed", None, "an expert's answer disagrees with the annotators"
        who = "annotators" if not usable else "annotators and feedback"
        return "resolved", base, f"settled by {who}"
    if usable:
        base = usable[-1]
        if not all(agree(base, other) for other in usable[:-1]):
            return "disputed", None, "experts disagree on the boxes"
        if len(usable) < len(evidence.feedback):
            return "disputed", None, "an expert called the boxes wrong without saying how"
        return "resolved", base, "settled by feedback"
    if evidence.feedback:
        return "unclear", None, "called wrong without saying which box"
    return "none", None, ""


def _feedback_truths(
    session: Session, project_id: int, image_id: int | None = None
) -> dict[int, list[list[dict[str, Any]] | None]]:
    q = (
        select(Prediction.image_id, Feedback.verdict, Feedback.boxes, Prediction.boxes)
        .join(Prediction, Prediction.id == Feedback.prediction_id)
        .where(Prediction.project_id == project_id)
        .order_by(Feedback.created_at)
    )
    if image_id is not None:
        q = q.where(Prediction.image_id == image_id)
    out: dict[int, list[list[dict[str, Any]] | None]] = defaultdict(list)
    for img, verdict, said, predicted in session.execute(q):
        out[img].append(implied_truth(verdict=verdict, predicted=predicted or [], said=said))
    return out


def evidence_of(
    session: Session, *, project_id: int = DEFAULT_PROJECT_ID, image_id: int | None = None
) -> dict[int, Evidence]:
    """Every piece of box evidence of the project's images (or of one image)."""
    out: dict[int, Evidence] = defaultdict(Evidence)
    q = (
        select(Annotation.image_id, Annotation.source, Annotation.boxes)
        .join(Image, Image.id == Annotation.image_id)
        .where(Image.project_id == project_id)
        .order_by(Annotation.created_at, Annotation.id)
    )
    if image_id is not None:
        q = q.where(Annotation.image_id == image_id)
    for img, source, boxes in session.execute(q):
        if source == AnnotationSource.LABEL_STUDIO:
            out[img].annotations.append(list(boxes or []))
        elif source == AnnotationSource.SEED:
            out[img].seed = list(boxes or [])
    for img, truths in _feedback_truths(session, project_id, image_id).items():
        out[img].feedback.extend(truths)
    return dict(out)


def settle_boxes(
    session: Session,
    *,
    image_id: int,
    prediction_id: str | None = None,
    project_id: int = DEFAULT_PROJECT_ID,
) -> ReviewState:
    """Settle one image's review item from the box evidence (``queue.settle`` for detection
    projects). An analyst's or ML lead's decision is final."""
    ev = evidence_of(session, project_id=project_id, image_id=image_id).get(image_id, Evidence())
    from quarkflow_core.queue.rules import item_to_settle

    item = item_to_settle(
        session, image_id=image_id, prediction_id=prediction_id, project_id=project_id
    )
    if item.decided_by_id is not None or item.state == ReviewState.DISMISSED:
        return item.state
    outcome, boxes, note = consensus(ev)
    if outcome == "resolved":
        item.state, item.resolved_boxes = ReviewState.RESOLVED, boxes
        item.resolved_label, item.note = box_summary(boxes), note
    elif outcome == "disputed":
        item.state, item.resolved_boxes, item.resolved_label = ReviewState.DISPUTED, None, None
        item.priority, item.note = max(item.priority, 1.0), note
    elif outcome == "unclear":
        item.reason = ReviewReason.USER_DISPUTED
        item.priority = max(item.priority, 1.0)
        if item.state in (ReviewState.CLOSED, ReviewState.RESOLVED):
            item.state = ReviewState.OPEN
        item.note = note
    session.flush()
    return item.state


@dataclass
class BoxResolution:
    boxes: dict[int, list[dict[str, Any]]] = field(default_factory=dict)
    source: dict[int, str] = field(default_factory=dict)
    unresolved: set[int] = field(default_factory=set)
    noise: set[int] = field(default_factory=set)


def resolve_boxes(*, session: Session, project_id: int = DEFAULT_PROJECT_ID) -> BoxResolution:
    """The module docstring's rule over every image of the project with box evidence."""
    out = BoxResolution()
    settled: dict[int, list[dict[str, Any]] | None] = {}
    for image_id, state, reason, boxes in session.execute(
        select(
            ReviewItem.image_id, ReviewItem.state, ReviewItem.reason, ReviewItem.resolved_boxes
        ).where(ReviewItem.project_id == project_id)
    ):
        if reason == ReviewReason.LABEL_NOISE:
            out.noise.add(image_id)
        if state == ReviewState.RESOLVED and boxes is not None:
            settled[image_id] = list(boxes)
        elif state == ReviewState.DISPUTED:
            settled[image_id] = None
    evidence = evidence_of(session, project_id=project_id)
    for image_id in set(evidence) | set(settled):
        if image_id in settled:
            if settled[image_id] is None:
                out.unresolved.add(image_id)
            else:
                out.boxes[image_id], out.source[image_id] = settled[image_id], "review"
            continue
        ev = evidence[image_id]
        outcome, boxes, _ = consensus(Evidence(ev.annotations, ev.feedback))
        if outcome == "resolved":
            source = "label_studio" if ev.annotations else "feedback"
            out.boxes[image_id], out.source[image_id] = boxes, source
        elif outcome in ("disputed", "unclear"):
            out.unresolved.add(image_id)
        elif ev.seed is not None:
            out.boxes[image_id], out.source[image_id] = ev.seed, "seed"
    return out


def build_detection_snapshot(
    *,
    session: Session,
    name: str = "retrain",
    holdout_share: float = 0.2,
    project_id: int = DEFAULT_PROJECT_ID,
) -> tuple[int, bool, dict[str, Any]]:
    """Snapshot of every image with settled boxes (idempotent), the hold-out grown by
    ``holdout_share`` of the new images. Returns (snapshot id, created, report) like
    ``labels.build_training_snapshot``."""
    from quarkflow_core.labels import _earlier_splits, seed_snapshot

    if not 0.0 < holdout_share <= 0.5:
        raise InvalidInput(f"holdout_share must be in (0, 0.5], got {holdout_share}")
    seed = seed_snapshot(session=session, project_id=project_id)
    seed_rows = session.execute(
        select(DatasetMember.image_id, DatasetMember.split, DatasetMember.boxes).where(
            DatasetMember.snapshot_id == seed.id
        )
    ).all()
    seed_members = {r.image_id for r in seed_rows}
    seed_holdout = {r.image_id: list(r.boxes or []) for r in seed_rows if r.split == Split.HOLDOUT}
    res = resolve_boxes(session=session, project_id=project_id)
    classes = list(seed.classes)
    shas = dict(
        session.execute(select(Image.id, Image.sha256).where(Image.project_id == project_id))
        .tuples()
        .all()
    )
    trained, held = _earlier_splits(session, project_id)
    unknown = 0
    labelled: dict[int, list[dict[str, Any]]] = {}
    for image_id, boxes in res.boxes.items():
        if image_id in seed_holdout or image_id in res.noise:
            continue
        if any(b["label"] not in classes for b in boxes):
            unknown += 1
            continue
        labelled[image_id] = boxes
    new = [i for i in labelled if i not in seed_members]
    kept = [i for i in new if i in held and i not in trained]
    fresh = sorted((i for i in new if i not in held and i not in trained), key=shas.__getitem__)
    short = max(0, round(holdout_share * len(new)) - len(kept))
    grown = set(kept) | set(fresh[:short])
    members = [MemberSpec(i, shas[i], "", Split.HOLDOUT, boxes=b) for i, b in seed_holdout.items()]
    members += [
        MemberSpec(i, shas[i], "", Split.HOLDOUT if i in grown else Split.TRAIN, boxes=b)
        for i, b in labelled.items()
    ]
    snap, created = create_snapshot(
        session=session,
        name=name,
        members=members,
        classes=classes,
        parent_id=seed.id,
        notes=(
            "seed + settled boxes from feedback and Label Studio (quarkflow_core.detection."
            f"labels); hold-out: seed + {holdout_share:g} of the new images"
        ),
        project_id=project_id,
    )
    sources = Counter(res.source[m.image_id] for m in members if m.split == Split.TRAIN)
    report = {
        "snapshot_id": snap.id,
        "created": created,
        "train": sum(1 for m in members if m.split == Split.TRAIN),
        "holdout": len(seed_holdout) + len(grown),
        "holdout_seed": len(seed_holdout),
        "holdout_grown": len(grown),
        "holdout_share": holdout_share,
        "sources": dict(sources),
        "holdout_sources": dict(Counter(res.source[i] for i in grown)),
        "unresolved": len(res.unresolved),
        "label_noise": len(res.noise),
        "unknown_labels": unknown,
        "class_counts": snap.class_counts,
        "boxes": sum(len(m.boxes or []) for m in members),
    }
    return snap.id, created, report

"""Which label does each image have for training? The rule behind every retraining snapshot,
and the count behind the "enough new labels" trigger.

Sources, strongest first (one label per image, images de-duplicated by content hash because
``images.sha256`` is unique):

0. **A settled review item** (``resolved``: annotators agreed with each other and with any
   feedback, or an analyst resolved it). A ``disputed`` item is left out until it is settled.
1. **Label Studio annotations**: the majority label of the annotators.
2. **Expert feedback** on predictions: "correct" confirms the predicted label, "wrong" with a
   true label gives that label ("wrong" without one gives none); the majority across feedback.
3. **Seed annotations**.

A tie within the strongest source that has labels makes the image *unresolved*: it is left out
of the snapshot (it stays disputed in the review queue until a person settles it). An image
whose review item was marked label noise is left out.

The **hold-out grows with the data, and never takes a trained image**:

* the seed snapshot's hold-out stays, with its seed labels, whatever later labels say;
* of the other labelled images, a share (``QF_HOLDOUT_SHARE``, 0.2) goes to the hold-out,
  per class: class c holds ``round(share * n_c)`` of its ``n_c`` non-seed labelled images;
* assignment is stable: an image that was in the train (or val) split of any earlier snapshot
  never moves to the hold-out (a model may have learnt it); one that was in an earlier
  hold-out stays there, with its current label, while it has one; new images fill each
  class's shortfall in sha256 order (deterministic, and unrelated to content).

Hold-out images never enter the training split. Comparisons score both versions on the newest
snapshot's hold-out (``registry.compare_versions``), so the test set grows with the labels.

All of it is per project (``project_id``, default: the default project): a project's labels
come from its images (annotations), its predictions (feedback) and its review queue, its
snapshots grow from its own seed snapshot, and its trigger counts only its new labels.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from quarkflow_core.datasets import MemberSpec, create_snapshot
from quarkflow_core.errors import InvalidInput, NotFound
from quarkflow_core.queue import feedback_label
from quarkflow_core.schema import (
    DEFAULT_PROJECT_ID,
    Annotation,
    AnnotationSource,
    DatasetMember,
    DatasetSnapshot,
    Feedback,
    Image,
    Prediction,
    ReviewItem,
    ReviewReason,
    ReviewState,
    Split,
)

SEED_NAME = "seed"


@dataclass
class Resolution:
    labels: dict[int, str] = field(default_factory=dict)  # image id -> label
    source: dict[int, str] = field(default_factory=dict)  # image id -> where it came from
    unresolved: dict[int, dict[str, int]] = field(default_factory=dict)  # image id -> votes
    noise: set[int] = field(default_factory=set)


def _majority(votes: Counter) -> str | None:
    (top, n), *rest = votes.most_common()
    return None if rest and rest[0][1] == n else top


def resolve_labels(*, session: Session, project_id: int = DEFAULT_PROJECT_ID) -> Resolution:
    """Apply the rule above to every image of the project with any label evidence."""
    studio: dict[int, Counter] = defaultdict(Counter)
    seed: dict[int, str] = {}
    for image_id, label, source in session.execute(
        select(Annotation.image_id, Annotation.label, Annotation.source)
        .join(Image, Image.id == Annotation.image_id)
        .where(Image.project_id == project_id)
    ):
        if source == AnnotationSource.LABEL_STUDIO:
            studio[image_id][label] += 1
        elif source == AnnotationSource.SEED:
            seed[image_id] = label
        else:  # feedback copied as annotations, if any
            studio.setdefault(image_id, Counter())
    feedback: dict[int, Counter] = defaultdict(Counter)
    for image_id, verdict, true_label, predicted in session.execute(
        select(Prediction.image_id, Feedback.verdict, Feedback.true_label, Prediction.label)
        .join(Prediction, Prediction.id == Feedback.prediction_id)
        .where(Prediction.project_id == project_id)
    ):
        label = feedback_label(verdict, true_label, predicted)
        if label:
            feedback[image_id][label] += 1
    out = Resolution()
    out.noise = set(
        session.scalars(
            select(ReviewItem.image_id).where(
                ReviewItem.project_id == project_id, ReviewItem.reason == ReviewReason.LABEL_NOISE
            )
        )
    )
    settled: dict[int, str | None] = {}
    for image_id, state, resolved in session.execute(
        select(ReviewItem.image_id, ReviewItem.state, ReviewItem.resolved_label).where(
            ReviewItem.project_id == project_id,
            ReviewItem.state.in_((ReviewState.RESOLVED, ReviewState.DISPUTED)),
        )
    ):
        settled[image_id] = resolved if state == ReviewState.RESOLVED else None
    for image_id in set(studio) | set(feedback) | set(seed) | set(settled):
        if image_id in settled:
            if settled[image_id] is None:
                out.unresolved[image_id] = {"disputed": 1}
            else:
                out.labels[image_id], out.source[image_id] = settled[image_id], "review"
            continue
        for name, votes in (
            ("label_studio", studio.get(image_id)),
            ("feedback", feedback.get(image_id)),
        ):
            if votes:
                winner = _majority(votes)
                if winner is None:
                    out.unresolved[image_id] = dict(votes)
                else:
                    out.labels[image_id], out.source[image_id] = winner, name
                break
        else:
            out.labels[image_id], out.source[image_id] = seed[image_id], "seed"
    return out


def seed_snapshot(*, session: Session, project_id: int = DEFAULT_PROJECT_ID) -> DatasetSnapshot:
    """The project's first snapshot named ``seed``."""
    snap = session.scalar(
        select(DatasetSnapshot)
        .where(DatasetSnapshot.project_id == project_id, DatasetSnapshot.name == SEED_NAME)
        .order_by(DatasetSnapshot.id)
        .limit(1)
    )
    if snap is None:
        if project_id == DEFAULT_PROJECT_ID:
            raise NotFound("no seed snapshot; run `quarkflow seed-demo` or import a seed data set")
        raise NotFound(f"project {project_id} has no seed snapshot; import a seed data set first")
    return snap


def _earlier_splits(session: Session, project_id: int) -> tuple[set[int], set[int]]:
    """(images ever in a train or val split, images ever in a hold-out split) of any of the
    project's snapshots."""
    trained: set[int] = set()
    held: set[int] = set()
    for image_id, split in session.execute(
        select(DatasetMember.image_id, DatasetMember.split)
        .join(DatasetSnapshot, DatasetSnapshot.id == DatasetMember.snapshot_id)
        .where(DatasetSnapshot.project_id == project_id)
        .distinct()
    ):
        (held if split == Split.HOLDOUT else trained).add(image_id)
    return trained, held


def build_training_snapshot(
    *,
    session: Session,
    name: str = "retrain",
    holdout_share: float = 0.2,
    project_id: int = DEFAULT_PROJECT_ID,
) -> tuple[int, bool, dict]:
    """Snapshot of everything labelled now (idempotent: same content, same snapshot), with the
    hold-out grown by ``holdout_share`` of the new labels per class (the module docstring).
    Returns (snapshot id, created, report). A detection project's snapshot holds boxes
    (``detection.labels.build_detection_snapshot``)."""
    from quarkflow_core.projects import is_detection

    if is_detection(session=session, project_id=project_id):
        from quarkflow_core.detection.labels import build_detection_snapshot

        return build_detection_snapshot(
            session=session, name=name, holdout_share=holdout_share, project_id=project_id
        )
    if not 0.0 < holdout_share <= 0.5:
        raise InvalidInput(f"holdout_share must be in (0, 0.5], got {holdout_share}")
    seed = seed_snapshot(session=session, project_id=project_id)
    seed_members = set(
        session.scalars(select(DatasetMember.image_id).where(DatasetMember.snapshot_id == seed.id))
    )
    seed_holdout = {
        image_id: label
        for image_id, label in session.execute(
            select(DatasetMember.image_id, DatasetMember.label).where(
                DatasetMember.snapshot_id == seed.id, DatasetMember.split == Split.HOLDOUT
            )
        )
    }
    res = resolve_labels(session=session, project_id=project_id)
    classes = list(seed.classes)
    shas = dict(
        session.execute(select(Image.id, Image.sha256).where(Image.project_id == project_id))
        .tuples()
        .all()
    )
    trained, held = _earlier_splits(session, project_id)
    skipped_unknown = 0
    labelled: dict[int, str] = {}  # usable labels outside the seed hold-out
    for image_id, label in res.labels.items():
        if image_id in seed_holdout or image_id in res.noise:
            continue
        if label not in classes:
            skipped_unknown += 1
            continue
        labelled[image_id] = label

    # the grown hold-out, per class, over the labelled images that are not seed members
    by_class: dict[str, list[int]] = defaultdict(list)
    for image_id, label in labelled.items():
        if image_id not in seed_members:
            by_class[label].append(image_id)
    grown: set[int] = set()
    added: Counter = Counter()
    for label, ids in by_class.items():
        kept = [i for i in ids if i in held and i not in trained]
        fresh = sorted((i for i in ids if i not in held and i not in trained), key=shas.__getitem__)
        short = max(0, round(holdout_share * len(ids)) - len(kept))
        grown.update(kept)
        grown.update(fresh[:short])
        added[label] += min(short, len(fresh))

    members = [MemberSpec(i, shas[i], label, Split.HOLDOUT) for i, label in seed_holdout.items()]
    members += [
        MemberSpec(i, shas[i], label, Split.HOLDOUT if i in grown else Split.TRAIN)
        for i, label in labelled.items()
    ]
    snap, created = create_snapshot(
        session=session,
        name=name,
        members=members,
        classes=classes,
        parent_id=seed.id,
        notes=(
            "seed + accepted feedback + Label Studio annotations (quarkflow_core.labels); "
            f"hold-out: seed + {holdout_share:g} of the new labels per class"
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
        "holdout_grown": len(grown),  # non-seed images in the hold-out, in total
        "holdout_added": sum(added.values()),  # of those, new in this snapshot's content
        "holdout_share": holdout_share,
        "sources": dict(sources),  # of the training split
        "holdout_sources": dict(Counter(res.source[i] for i in grown)),
        "unresolved": len(res.unresolved),
        "label_noise": len(res.noise),
        "unknown_labels": skipped_unknown,
        "class_counts": snap.class_counts,
    }
    return snap.id, created, report


def new_labels_since(
    *, session: Session, since: datetime | None = None, project_id: int = DEFAULT_PROJECT_ID
) -> dict[str, Any]:
    """The project's labels (feedback with a label, Label Studio annotations) created after
    ``since`` (default: the project's newest snapshot), in total and per class."""
    if since is None:
        since = session.scalar(
            select(func.max(DatasetSnapshot.created_at)).where(
                DatasetSnapshot.project_id == project_id
            )
        )
    per_class: Counter = Counter()
    fb = (
        select(Feedback.verdict, Feedback.true_label, Prediction.label)
        .join(Prediction, Prediction.id == Feedback.prediction_id)
        .where(Prediction.project_id == project_id)
    )
    ann = (
        select(Annotation.label)
        .join(Image, Image.id == Annotation.image_id)
        .where(Image.project_id == project_id, Annotation.source == AnnotationSource.LABEL_STUDIO)
    )
    if since is not None:
        fb = fb.where(Feedback.created_at > since)
        ann = ann.where(Annotation.created_at > since)
    for verdict, true_label, predicted in session.execute(fb):
        label = feedback_label(verdict, true_label, predicted)
        if label:
            per_class[label] += 1
    for (label,) in session.execute(ann):
        per_class[label] += 1
    return {
        "since": since.isoformat() if since else None,
        "total": sum(per_class.values()),
        "per_class": dict(per_class),
    }


def retrain_due(
    counts: dict[str, Any], *, min_new_labels: int, min_per_class: int | None = None
) -> tuple[bool, str]:
    """Whether enough new labels have accumulated, and why (or why not)."""
    total = counts["total"]
    if total < min_new_labels:
        return False, f"{total} new labels since {counts['since']}; waiting for {min_new_labels}"
    if min_per_class:
        short = {c: n for c, n in counts["per_class"].items() if n < min_per_class}
        if short or not counts["per_class"]:
            return False, f"{total} new labels, but classes below {min_per_class}: {short}"
    return True, f"{total} new labels since {counts['since']} (threshold {min_new_labels})"


def retrain_check(
    *, session: Session, settings: Any, project_id: int = DEFAULT_PROJECT_ID
) -> tuple[bool, str, dict[str, Any]]:
    """(due, why, counts) of the project under QF_RETRAIN_MIN_NEW_LABELS (0 = never) and
    QF_RETRAIN_MIN_PER_CLASS: what both the label_trigger flow and the webhook decide on."""
    counts = new_labels_since(session=session, project_id=project_id)
    if settings.retrain_min_new_labels <= 0:
        return False, "the label trigger is off (QF_RETRAIN_MIN_NEW_LABELS=0)", counts
    due, why = retrain_due(
        counts,
        min_new_labels=settings.retrain_min_new_labels,
        min_per_class=settings.retrain_min_per_class,
    )
    return due, why, counts

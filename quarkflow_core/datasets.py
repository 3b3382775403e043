"""Dataset snapshots: an immutable, content-hashed list of (image, label, split), and for a
detection project (image, boxes, split): each member's ground-truth boxes (``boxes``; its
``label`` is then empty).

A snapshot belongs to a project (``project_id``, default: the default project) and lists only
that project's images; its content hash is unique within the project. Another project's
snapshot is not found, exactly like an unknown id."""

from __future__ import annotations

import hashlib
import json
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from quarkflow_core.errors import InvalidInput, NotFound
from quarkflow_core.schema import DEFAULT_PROJECT_ID, DatasetMember, DatasetSnapshot, Image, Split

_IN_CHUNK = 5000  # ids per IN (...) list: well under SQLite's and Postgres's parameter limits


@dataclass(frozen=True)
class MemberSpec:
    image_id: int
    sha256: str
    label: str
    split: Split
    boxes: list[dict[str, Any]] | None = None  # detection: [{"label", "box"}] in pixels


@dataclass(frozen=True)
class SnapshotItem:
    """What training and evaluation read: where the bytes are and what they are."""

    image_id: int
    sha256: str
    storage_key: str
    label: str
    split: Split
    boxes: list[dict[str, Any]] | None = None


def snapshot_hash(members: Iterable[MemberSpec], classes: Sequence[str]) -> str:
    """Order-independent hash of the content: same images, labels (boxes) and splits -> same
    hash. A classification snapshot's hash is what it was before detection existed."""
    h = hashlib.sha256()
    h.update(json.dumps(list(classes)).encode())
    rows = sorted(
        (m.sha256, m.label, m.split.value, "" if m.boxes is None else _boxes_text(m.boxes))
        for m in members
    )
    for sha, label, split, boxes in rows:
        h.update(f"{sha}\t{label}\t{split}{boxes and chr(9) + boxes}\n".encode())
    return h.hexdigest()


def _boxes_text(boxes: Sequence[dict[str, Any]]) -> str:
    """Canonical text of a box list: order-independent, 2 decimals."""
    keyed = sorted((b["label"], *(round(float(v), 2) for v in b["box"])) for b in boxes)
    return json.dumps(keyed)


def stratified_holdout(
    labels: Sequence[str] | Sequence[int], *, fraction: float, seed: int
) -> list[bool]:
    """Deterministic per-class split: True marks a hold-out item (round(fraction * n_class))."""
    if not 0.0 < fraction < 1.0:
        raise InvalidInput(f"hold-out fraction must be in (0, 1), got {fraction}")
    by_class: dict[str | int, list[int]] = defaultdict(list)
    for i, label in enumerate(labels):
        by_class[label].append(i)
    rng = np.random.default_rng(seed)
    mask = [False] * len(labels)
    for label in sorted(by_class):
        idx = np.array(by_class[label])
        rng.shuffle(idx)
        for i in idx[: round(fraction * len(idx))]:
            mask[int(i)] = True
    return mask


def class_counts(members: Iterable[MemberSpec]) -> dict[str, dict[str, int]]:
    """Per split: images per label, or for a detection snapshot boxes per label."""
    counts: dict[str, Counter] = defaultdict(Counter)
    for m in members:
        if m.boxes is None:
            counts[m.split.value][m.label] += 1
        else:
            counts[m.split.value].update(b["label"] for b in m.boxes)
    return {split: dict(sorted(c.items())) for split, c in sorted(counts.items())}


def create_snapshot(
    *,
    session: Session,
    name: str,
    members: Sequence[MemberSpec],
    classes: Sequence[str],
    parent_id: int | None = None,
    notes: str | None = None,
    project_id: int = DEFAULT_PROJECT_ID,
) -> tuple[DatasetSnapshot, bool]:
    """Create a snapshot of the project's images, or return the project's existing one with
    identical content (idempotent). An image (or parent) of another project is not found."""
    if not members:
        raise InvalidInput("a dataset snapshot needs at least one member")
    used = {b["label"] for m in members if m.boxes for b in m.boxes}
    used |= {m.label for m in members if m.boxes is None}
    unknown = used - set(classes)
    if unknown:
        raise InvalidInput(f"labels not in the class list: {sorted(unknown)}")
    seen: set[int] = set()
    for m in members:
        if m.image_id in seen:
            raise InvalidInput(f"image {m.image_id} appears twice in the snapshot")
        seen.add(m.image_id)
    digest = snapshot_hash(members, classes)
    existing = session.scalar(
        select(DatasetSnapshot).where(
            DatasetSnapshot.project_id == project_id, DatasetSnapshot.content_hash == digest
        )
    )
    if existing is not None:
        return existing, False
    _check_images(session, sorted(seen), project_id)
    if parent_id is not None:
        get_snapshot(session=session, snapshot_id=parent_id, project_id=project_id)
    snap = DatasetSnapshot(
        project_id=project_id,
        name=name,
        content_hash=digest,
        classes=list(classes),
        class_counts=class_counts(members),
        num_items=len(members),
        parent_id=parent_id,
        notes=notes,
    )
    session.add(snap)
    session.flush()
    session.bulk_insert_mappings(
        DatasetMember,
        [
            {
                "snapshot_id": snap.id,
                "image_id": m.image_id,
                "label": m.label,
                "split": m.split,
                "boxes": m.boxes,
            }
            for m in members
        ],
    )
    session.flush()
    return snap, True


def _check_images(session: Session, image_ids: list[int], project_id: int) -> None:
    """NotFound unless every image id is one of the project's images."""
    found: set[int] = set()
    for start in range(0, len(image_ids), _IN_CHUNK):
        chunk = image_ids[start : start + _IN_CHUNK]
        found.update(
            session.scalars(
                select(Image.id).where(Image.project_id == project_id, Image.id.in_(chunk))
            )
        )
    missing = [i for i in image_ids if i not in found]
    if missing:
        raise NotFound(
            f"no image with id {missing[0]}"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
        )


def get_snapshot(
    *, session: Session, snapshot_id: int, project_id: int = DEFAULT_PROJECT_ID
) -> DatasetSnapshot:
    snap = session.get(DatasetSnapshot, snapshot_id)
    if snap is None or snap.project_id != project_id:
        raise NotFound(f"no dataset snapshot with id {snapshot_id}")
    return snap


def list_snapshots(
    *, session: Session, project_id: int = DEFAULT_PROJECT_ID
) -> list[DatasetSnapshot]:
    return list(
        session.scalars(
            select(DatasetSnapshot)
            .where(DatasetSnapshot.project_id == project_id)
            .order_by(DatasetSnapshot.id)
        )
    )


def snapshot_items(
    *,
    session: Session,
    snapshot_id: int,
    split: Split | None = None,
    project_id: int = DEFAULT_PROJECT_ID,
) -> list[SnapshotItem]:
    get_snapshot(session=session, snapshot_id=snapshot_id, project_id=project_id)
    q = (
        select(
            DatasetMember.image_id,
            Image.sha256,
            Image.storage_key,
            DatasetMember.label,
            DatasetMember.split,
            DatasetMember.boxes,
        )
        .join(Image, Image.id == DatasetMember.image_id)
        .where(DatasetMember.snapshot_id == snapshot_id)
        .order_by(Image.sha256)
    )
    if split is not None:
        q = q.where(DatasetMember.split == split)
    return [SnapshotItem(*row) for row in session.execute(q)]

"""A detection snapshot's splits as ``DetectionSet``s: each member's image read from storage
and decoded once (RGB, original size), its ground-truth boxes from the snapshot."""

from __future__ import annotations

import io
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image as PILImage
from sqlalchemy.orm import Session

from quarkflow_core.datasets import get_snapshot, snapshot_items
from quarkflow_core.detection.boxes import to_arrays
from quarkflow_core.detection.data import DetectionSet
from quarkflow_core.schema import DEFAULT_PROJECT_ID, Split
from quarkflow_core.storage import Storage


def _decode(data: bytes) -> np.ndarray:
    with PILImage.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"), dtype=np.uint8)


def load_detection_snapshot(
    *,
    session: Session,
    storage: Storage,
    snapshot_id: int,
    splits: Sequence[Split] = (Split.TRAIN, Split.HOLDOUT),
    project_id: int = DEFAULT_PROJECT_ID,
    workers: int = 8,
) -> dict[Split, DetectionSet]:
    """The snapshot's splits (those with members), decoded; another project's snapshot is not
    found. Members are in sha256 order, so a split is the same list on every machine."""
    snap = get_snapshot(session=session, snapshot_id=snapshot_id, project_id=project_id)
    classes = list(snap.classes)
    out: dict[Split, DetectionSet] = {}
    for split in splits:
        items = snapshot_items(
            session=session, snapshot_id=snapshot_id, split=split, project_id=project_id
        )
        if not items:
            continue
        with ThreadPoolExecutor(max_workers=workers) as pool:
            images = list(pool.map(lambda it: _decode(storage.get(it.storage_key)), items))
        arrays = [to_arrays(it.boxes or [], classes) for it in items]
        out[split] = DetectionSet(
            images=images,
            boxes=[a[0] for a in arrays],
            labels=[a[1] for a in arrays],
            classes=classes,
            ids=[it.image_id for it in items],
        )
    return out

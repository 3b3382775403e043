"""Labelled image sets in memory: uint8 tensors at the preset size, decoded once.

Small images (the demo digits) fit in memory many times over; batches are normalized and
augmented on the fly, on the training device."""

from __future__ import annotations

import io
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image as PILImage
from sqlalchemy.orm import Session

from quarkflow_core.datasets import (
    SnapshotItem,
    get_snapshot,
    snapshot_items,
    stratified_holdout,
)
from quarkflow_core.errors import InvalidInput
from quarkflow_core.ml.transforms import Preprocess
from quarkflow_core.schema import DEFAULT_PROJECT_ID, Split
from quarkflow_core.storage import Storage


@dataclass
class ImageSet:
    images: torch.Tensor  # uint8 (N, C, H, W)
    labels: torch.Tensor  # int64 (N,)
    classes: list[str]
    ids: list[str]  # sha256 of each source image (stable across runs)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, index: Sequence[int] | np.ndarray | torch.Tensor) -> ImageSet:
        idx = torch.as_tensor(np.asarray(index), dtype=torch.long)
        return ImageSet(
            self.images[idx], self.labels[idx], self.classes, [self.ids[i] for i in idx.tolist()]
        )


def decode(data: bytes, preset: Preprocess) -> np.ndarray:
    with PILImage.open(io.BytesIO(data)) as img:
        return preset.to_array(img).transpose(2, 0, 1)  # C, H, W


def from_arrays(
    images: np.ndarray,
    labels: Sequence[int],
    classes: list[str],
    preset: Preprocess,
    ids: Sequence[str] | None = None,
) -> ImageSet:
    """Build from an (N, H, W[, C]) uint8 array, e.g. sklearn's digits in tests."""
    arrs = [preset.to_array(PILImage.fromarray(np.asarray(im, dtype=np.uint8))) for im in images]
    stacked = torch.from_numpy(np.stack(arrs).transpose(0, 3, 1, 2).copy())
    return ImageSet(
        stacked,
        torch.as_tensor(list(labels), dtype=torch.long),
        list(classes),
        list(ids) if ids is not None else [str(i) for i in range(len(arrs))],
    )


def load_items(
    storage: Storage,
    items: Sequence[SnapshotItem],
    classes: list[str],
    preset: Preprocess,
    *,
    workers: int = 8,
) -> ImageSet:
    index = {c: i for i, c in enumerate(classes)}
    unknown = {it.label for it in items} - set(index)
    if unknown:
        raise InvalidInput(f"labels not in the class list: {sorted(unknown)}")

    def fetch(it: SnapshotItem) -> np.ndarray:
        return decode(storage.get(it.storage_key), preset)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        arrays = list(pool.map(fetch, items))
    if not arrays:
        raise InvalidInput("no images to load")
    return ImageSet(
        torch.from_numpy(np.stack(arrays)),
        torch.tensor([index[it.label] for it in items], dtype=torch.long),
        list(classes),
        [it.sha256 for it in items],
    )


def load_snapshot(
    *,
    session: Session,
    storage: Storage,
    snapshot_id: int,
    preset: Preprocess,
    splits: Sequence[Split] = (Split.TRAIN, Split.HOLDOUT),
    project_id: int = DEFAULT_PROJECT_ID,
) -> dict[Split, ImageSet]:
    """The snapshot's splits, decoded; another project's snapshot is not found."""
    snap = get_snapshot(session=session, snapshot_id=snapshot_id, project_id=project_id)
    out = {}
    for split in splits:
        items = snapshot_items(
            session=session, snapshot_id=snapshot_id, split=split, project_id=project_id
        )
        if items:
            out[split] = load_items(storage, items, list(snap.classes), preset)
    return out


def stratified_split(
    labels: torch.Tensor, *, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(keep_index, split_index): the seeded per-class split the seed hold-out uses, here for
    the validation carve-out."""
    held = np.array(stratified_holdout(labels.tolist(), fraction=fraction, seed=seed))
    return np.nonzero(~held)[0], np.nonzero(held)[0]


def sklearn_digits(preset: Preprocess) -> ImageSet:
    """scikit-learn's 1,797 8x8 digits (shipped with sklearn), upscaled to the preset size."""
    from sklearn.datasets import load_digits

    d = load_digits()
    imgs = (d.images / 16.0 * 255).astype(np.uint8)
    return from_arrays(
        imgs,
        d.target.tolist(),
        [str(i) for i in range(10)],
        preset,
        ids=[f"digits:{i}" for i in range(len(imgs))],
    )

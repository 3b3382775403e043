"""Detection data in memory: images of any size with their boxes, decoded once.

Unlike ``ml.data.ImageSet`` nothing is resized here: a detector's own transform resizes each
image (and its boxes) on the training device, and predictions come back in the original
pixels, so ground truth stays in the coordinates people labelled it in."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from quarkflow_core.errors import InvalidInput


@dataclass
class DetectionSet:
    images: list[np.ndarray]  # uint8 (H, W, 3) RGB, sizes may differ
    boxes: list[np.ndarray]  # float32 (k, 4) xyxy px, per image (k may be 0)
    labels: list[np.ndarray]  # int64 (k,) indices into classes
    classes: list[str]
    ids: list[int] | None = None  # image ids (database) when known

    def __post_init__(self) -> None:
        """Coerce dtypes and refuse what a detector would choke on later, mid-epoch, with the
        image named: a degenerate box makes torchvision raise deep inside its loss."""
        n = len(self.images)
        if len(self.boxes) != n or len(self.labels) != n:
            raise InvalidInput(
                f"{n} images but {len(self.boxes)} box arrays and {len(self.labels)} label arrays"
            )
        if self.ids is not None and len(self.ids) != n:
            raise InvalidInput(f"{n} images but {len(self.ids)} ids")
        if not self.classes:
            raise InvalidInput("a detection set needs at least one class")
        self.boxes = [np.asarray(b, dtype=np.float32).reshape(-1, 4) for b in self.boxes]
        self.labels = [np.asarray(lab, dtype=np.int64).reshape(-1) for lab in self.labels]
        for i, (img, b, lab) in enumerate(zip(self.images, self.boxes, self.labels, strict=True)):
            if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
                raise InvalidInput(
                    f"image {i}: need uint8 (H, W, 3) RGB, got {img.dtype} {img.shape}"
                )
            if len(b) != len(lab):
                raise InvalidInput(f"image {i}: {len(b)} boxes but {len(lab)} labels")
            if len(b) and not (
                np.isfinite(b).all() and (b[:, 2] > b[:, 0]).all() and (b[:, 3] > b[:, 1]).all()
            ):
                raise InvalidInput(f"image {i}: a box is degenerate (need x2 > x1, y2 > y1)")
            if len(lab) and (lab.min() < 0 or lab.max() >= len(self.classes)):
                raise InvalidInput(
                    f"image {i}: label index out of range for {len(self.classes)} classes"
                )

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, idx: Sequence[int] | np.ndarray) -> DetectionSet:
        """The images at ``idx`` (arrays shared, not copied), same classes."""
        index = [int(i) for i in np.asarray(idx, dtype=np.int64).reshape(-1)]
        return DetectionSet(
            images=[self.images[i] for i in index],
            boxes=[self.boxes[i] for i in index],
            labels=[self.labels[i] for i in index],
            classes=list(self.classes),
            ids=[self.ids[i] for i in index] if self.ids is not None else None,
        )

    @classmethod
    def from_samples(cls, samples: Sequence, classes: Sequence[str]) -> DetectionSet:
        """From ``synth.DetectionSample``s (or anything with ``image``, ``boxes`` and string
        ``labels``); a label outside ``classes`` is refused, naming it."""
        classes = list(classes)
        index = {c: i for i, c in enumerate(classes)}
        unknown = sorted({lab for s in samples for lab in s.labels} - set(index))
        if unknown:
            raise InvalidInput(f"labels not in the class list: {unknown}")
        return cls(
            images=[np.asarray(s.image) for s in samples],
            boxes=[np.asarray(s.boxes, dtype=np.float32) for s in samples],
            labels=[np.asarray([index[lab] for lab in s.labels], dtype=np.int64) for s in samples],
            classes=classes,
        )

    def targets(self) -> list[dict[str, np.ndarray]]:
        """Ground truth per image as the metric code takes it: {"boxes", "labels"}."""
        return [{"boxes": b, "labels": lab} for b, lab in zip(self.boxes, self.labels, strict=True)]

    def num_boxes(self) -> int:
        return int(sum(len(b) for b in self.boxes))


def split_detection(n: int, fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(keep_index, held_index): a seeded random ``fraction`` of ``n`` images held out (at
    least one, and at least one kept). Images, not boxes, are split, so no image is in both."""
    if n < 2:
        raise InvalidInput(f"need at least 2 images to split, got {n}")
    if not 0.0 < fraction < 1.0:
        raise InvalidInput(f"fraction must be in (0, 1), got {fraction}")
    held_n = min(max(round(n * fraction), 1), n - 1)
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[held_n:]), np.sort(order[:held_n])

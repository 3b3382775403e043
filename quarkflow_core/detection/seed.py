"""A detection project's seed data set: digits on photos (``synth``) as images, seed
annotations with their boxes, and the seed snapshot with a fixed hold-out, through the same
``demo_data.ingest_seed`` as the classification demo (idempotent: the same ``n`` and ``seed``
give the same images, so running it again changes nothing)."""

from __future__ import annotations

from sqlalchemy.orm import Session

from quarkflow_core.demo_data import Progress, SeedReport, ingest_seed
from quarkflow_core.detection.synth import encode_png, iter_digits_on_photos
from quarkflow_core.schema import DEFAULT_PROJECT_ID
from quarkflow_core.storage import Storage

DIGIT_CLASSES = [str(d) for d in range(10)]
SEED_ANNOTATOR = "digits-on-photos"
HOLDOUT_FRACTION = 0.25


def sample_boxes(sample) -> list[dict]:
    """A synth sample's boxes in the contract's format (pixels, 2 decimals)."""
    return [
        {"label": label, "box": [round(float(v), 2) for v in box]}
        for label, box in zip(sample.labels, sample.boxes, strict=True)
    ]


def box_summary(boxes: list[dict] | None) -> str:
    """The one-line label a detection row carries where classification has a class."""
    n = len(boxes or [])
    return "no objects" if n == 0 else f"{n} box" if n == 1 else f"{n} boxes"


def seed_digits_on_photos(
    *,
    session: Session,
    storage: Storage,
    n: int = 400,
    seed: int = 0,
    size: int = 320,
    holdout_fraction: float = HOLDOUT_FRACTION,
    progress: Progress | None = None,
    project_id: int = DEFAULT_PROJECT_ID,
) -> SeedReport:
    """``n`` digits-on-photos images as the project's seed data set (a share
    ``holdout_fraction`` held out, fixed)."""
    pngs, boxes = [], []
    # digits of 12..180 px on 320 px images; smaller images get proportionally smaller ones
    digit_px = (12, min(180, size * 9 // 16))
    for sample in iter_digits_on_photos(n, seed=seed, size=size, digit_px=digit_px):
        pngs.append(encode_png(sample))
        boxes.append(sample_boxes(sample))
    return ingest_seed(
        session=session,
        storage=storage,
        images=pngs,
        labels=[box_summary(b) for b in boxes],
        classes=DIGIT_CLASSES,
        annotator=SEED_ANNOTATOR,
        notes=(
            f"{n} MNIST digits-on-photos images (seed {seed}, {size} px), "
            f"{holdout_fraction:.0%} fixed hold-out"
        ),
        progress=progress,
        project_id=project_id,
        boxes=boxes,
        holdout_fraction=holdout_fraction,
    )

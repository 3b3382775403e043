"""What the prediction service does with a detection: the model input of an upload, the boxes
it found in the upload's own pixels, and the summary that is logged and decides review.

A detection goes to review when any box scores in the band around the model's threshold
(``REVIEW_BAND``): the boxes a person would most likely judge differently from the model. Its
priority follows the queue's uncertainty (``queue.uncertainty``): the closer a box's score is
to the threshold, and the larger the share of boxes in the band, the sooner it is reviewed.
The logged boxes are those scoring at least ``threshold - REVIEW_BAND`` (``shown`` marks those
at or over the threshold: what the expert saw)."""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image as PILImage

from quarkflow_core.detection.seed import box_summary

REVIEW_BAND = 0.15
MAX_LOGGED_BOXES = 100
MAX_SIDE = 1024  # an upload's long side is brought down to this before detection


def model_input(img: PILImage.Image, *, max_side: int = MAX_SIDE) -> tuple[np.ndarray, float]:
    """(uint8 RGB array, scale): the decoded upload, shrunk so its long side is at most
    ``max_side`` (detectors resize to a few hundred pixels anyway); boxes found in it are
    divided by ``scale`` to land in the upload's pixels."""
    scale = min(1.0, max_side / max(img.size))
    if scale < 1.0:
        size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
        img = img.convert("RGB").resize(size, PILImage.Resampling.BILINEAR)
    return np.asarray(img.convert("RGB"), dtype=np.uint8), scale


def to_original(
    boxes: list[dict[str, Any]], *, scale: float, width: int, height: int
) -> list[dict[str, Any]]:
    """Boxes found in a shrunk input, in the original image's pixels (clipped, 0.01 px)."""
    out = []
    for b in boxes:
        x1, y1, x2, y2 = (float(v) / scale for v in b["box"])
        box = [
            round(min(max(x1, 0.0), width), 2),
            round(min(max(y1, 0.0), height), 2),
            round(min(max(x2, 0.0), width), 2),
            round(min(max(y2, 0.0), height), 2),
        ]
        if box[2] > box[0] and box[3] > box[1]:
            out.append({**b, "box": box})
    return out


def summarize_boxes(
    boxes: list[dict[str, Any]], *, threshold: float, band: float = REVIEW_BAND
) -> dict[str, Any]:
    """The logged summary of a detection: ``label``/``confidence`` of its top shown box,
    ``margin`` (how far, in bands, the most uncertain box is from the threshold), ``entropy``
    (the share of boxes in the band), ``review`` and the kept boxes with ``shown``."""
    floor = max(0.0, threshold - band)
    kept = sorted((b for b in boxes if b["score"] >= floor), key=lambda b: -b["score"])
    kept = [{**b, "shown": b["score"] >= threshold} for b in kept[:MAX_LOGGED_BOXES]]
    shown = [b for b in kept if b["shown"]]
    in_band = [b for b in kept if abs(b["score"] - threshold) < band]
    distance = min((abs(b["score"] - threshold) / band for b in in_band), default=1.0)
    return {
        "label": shown[0]["label"] if shown else box_summary([]),
        "confidence": round(float(shown[0]["score"]), 6) if shown else 0.0,
        "topk": [],
        "margin": round(float(distance), 6),
        "entropy": round(len(in_band) / len(kept), 6) if kept else 0.0,
        "review": bool(in_band),
        "boxes": kept,
        "uncertain_boxes": len(in_band),
    }


def boxes_summary(
    predictor: Any,
    array: np.ndarray,
    *,
    scale: float,
    width: int,
    height: int,
    threshold: float,
) -> dict[str, Any]:
    """``summarize_boxes`` of what ``predictor`` finds in a model input (``model_input``), in
    the original image's pixels."""
    found = to_original(predictor.predict_array(array), scale=scale, width=width, height=height)
    return summarize_boxes(found, threshold=threshold)


def detect_summary(
    predictor: Any, image: PILImage.Image, *, width: int, height: int, threshold: float
) -> dict[str, Any]:
    """``boxes_summary`` of a decoded image: what the API, the batch flow and the review
    queue's re-scoring log for a detection."""
    array, scale = model_input(image)
    return boxes_summary(
        predictor, array, scale=scale, width=width, height=height, threshold=threshold
    )

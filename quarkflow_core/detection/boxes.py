"""Boxes as users, the API and the database hold them, and the geometry the metrics share.

A box is ``{"label": "7", "box": [x1, y1, x2, y2]}`` in pixels of the original image (x2, y2
exclusive, as in ``synth``); a predicted box adds ``"score"``. ``parse_boxes`` is the one gate
for boxes that come from outside (a reviewer's drawing, an API call, Label Studio): it refuses
what the metrics would silently mis-count (an unknown label, a NaN, a box off the image) with
the box's index and the reason, so the person who sent it can fix it.

``iou_matrix``, ``match_boxes`` and ``agreement`` compare two box lists: two annotators, or two
model versions on the same image.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from quarkflow_core.errors import InvalidInput

MAX_BOXES = 300  # per image: more is a runaway client or an unthresholded detector, not labels
OVERSHOOT_PX = (
    1.0  # a drawing tool's rounding may poke this far past the edge: clipped, not refused
)
DECIMALS = 2  # 0.01 px: finer is noise, and it keeps the stored JSON short
BOX_KEYS = {"label", "box"}


def _number(value: Any, what: str) -> float:
    """``value`` as a finite float, or InvalidInput naming ``what`` (bools are not numbers)."""
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise InvalidInput(f"{what} must be a number, got {value!r}")
    out = float(value)
    if not math.isfinite(out):
        raise InvalidInput(f"{what} must be finite, got {out}")
    return out


def _edges(values: Any, where: str, width: int, height: int) -> list[float]:
    """Four finite, ordered coordinates inside the image (tiny overshoot clipped), rounded."""
    if not isinstance(values, list | tuple) or len(values) != 4:
        raise InvalidInput(f"{where}: box must be [x1, y1, x2, y2], got {values!r}")
    names = ("x1", "y1", "x2", "y2")
    x1, y1, x2, y2 = (_number(v, f"{where}: {n}") for v, n in zip(values, names, strict=True))
    if x2 <= x1 or y2 <= y1:
        raise InvalidInput(
            f"{where}: box [{x1:g}, {y1:g}, {x2:g}, {y2:g}] is empty or inverted "
            "(need x2 > x1 and y2 > y1)"
        )
    for name, v, limit in zip(names, (x1, y1, x2, y2), (width, height) * 2, strict=True):
        if v < -OVERSHOOT_PX or v > limit + OVERSHOOT_PX:
            raise InvalidInput(
                f"{where}: {name} = {v:g} is outside the {width}x{height} image "
                f"(allowed 0..{limit}, give or take {OVERSHOOT_PX:g} px)"
            )
    x1, x2 = (round(min(max(v, 0.0), width), DECIMALS) for v in (x1, x2))
    y1, y2 = (round(min(max(v, 0.0), height), DECIMALS) for v in (y1, y2))
    if x2 <= x1 or y2 <= y1:
        raise InvalidInput(f"{where}: box is empty once clipped to the image and rounded")
    return [x1, y1, x2, y2]


def parse_boxes(
    raw: Any, *, width: int, height: int, classes: Sequence[str], scored: bool = False
) -> list[dict[str, Any]]:
    """Validate boxes from outside and return them normalised (floats rounded to 0.01 px,
    coordinates clipped to the image when they overshoot by at most 1 px).

    ``scored``: each box needs a ``score`` in [0, 1] (model output). Without it a ``score``
    key is dropped, so a reviewed prediction can be stored as ground truth as is; any other
    unknown key is refused, since it is most likely a typo (``"bbox"``, ``"class"``)."""
    if isinstance(width, bool) or not isinstance(width, int) or width <= 0:
        raise InvalidInput(f"image width must be a positive integer, got {width!r}")
    if isinstance(height, bool) or not isinstance(height, int) or height <= 0:
        raise InvalidInput(f"image height must be a positive integer, got {height!r}")
    if not classes:
        raise InvalidInput("no classes to label boxes with")
    if not isinstance(raw, list | tuple):
        raise InvalidInput(
            f'boxes must be a list of {{"label", "box"}} objects, got {type(raw).__name__}'
        )
    if len(raw) > MAX_BOXES:
        raise InvalidInput(f"{len(raw)} boxes in one image; at most {MAX_BOXES} are accepted")
    known = set(classes)
    allowed = BOX_KEYS | {"score"}
    out = []
    for i, item in enumerate(raw):
        where = f"box {i}"
        if not isinstance(item, dict):
            raise InvalidInput(f'{where}: must be an object {{"label", "box"}}, got {item!r}')
        missing = sorted(BOX_KEYS - item.keys() | ({"score"} - item.keys() if scored else set()))
        if missing:
            raise InvalidInput(f"{where}: missing {', '.join(missing)}")
        extra = sorted(str(k) for k in item.keys() - allowed)
        if extra:
            raise InvalidInput(
                f"{where}: unknown key(s) {', '.join(extra)} (a box has label, box"
                f"{', score' if scored else ''})"
            )
        label = item["label"]
        if not isinstance(label, str):
            raise InvalidInput(f"{where}: label must be a string (a class name), got {label!r}")
        if label not in known:
            valid = ", ".join(classes) if len(classes) <= 20 else f"{', '.join(classes[:20])}, …"
            raise InvalidInput(f"{where}: unknown label {label!r}; valid labels: {valid}")
        box: dict[str, Any] = {"label": label, "box": _edges(item["box"], where, width, height)}
        if scored:
            score = _number(item["score"], f"{where}: score")
            if not 0.0 <= score <= 1.0:
                raise InvalidInput(f"{where}: score must be in [0, 1], got {score:g}")
            box["score"] = round(score, 4)
        out.append(box)
    return out


def to_arrays(boxes: Sequence[dict[str, Any]], classes: Sequence[str]) -> tuple[np.ndarray, ...]:
    """Box dicts as arrays: boxes float32 (k, 4) and labels int64 (k,) (indices into
    ``classes``), the layout the metrics and torchvision take."""
    index = {c: i for i, c in enumerate(classes)}
    try:
        labels = np.array([index[b["label"]] for b in boxes], dtype=np.int64)
    except KeyError as err:
        raise InvalidInput(
            f"unknown label {err.args[0]!r}; valid labels: {list(classes)}"
        ) from None
    xyxy = np.array([b["box"] for b in boxes], dtype=np.float32).reshape(-1, 4)
    return xyxy, labels


def to_dicts(
    boxes: np.ndarray,
    labels: np.ndarray,
    classes: Sequence[str],
    scores: np.ndarray | None = None,
) -> list[dict[str, Any]]:
    """Arrays back to box dicts (floats rounded to 0.01 px, scores to 4 decimals), JSON-ready."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    labels = np.asarray(labels).reshape(-1)
    if len(labels) != len(boxes) or (scores is not None and len(scores) != len(boxes)):
        raise InvalidInput("boxes, labels and scores must have the same length")
    out = []
    for k, (box, label) in enumerate(zip(boxes.tolist(), labels.tolist(), strict=True)):
        if not 0 <= label < len(classes):
            raise InvalidInput(f"box {k}: label index {label} is not one of {len(classes)} classes")
        item: dict[str, Any] = {"label": classes[label], "box": [round(v, DECIMALS) for v in box]}
        if scores is not None:
            item["score"] = round(float(scores[k]), 4)
        out.append(item)
    return out


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box in ``a`` (n, 4) with every box in ``b`` (m, 4), xyxy: float64 (n, m).
    A pair with zero union (two empty boxes) has IoU 0."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    area_a = np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)
    area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    w = np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0])
    h = np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1])
    inter = np.clip(w, 0, None) * np.clip(h, 0, None)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def match_arrays(
    boxes_a: np.ndarray,
    labels_a: np.ndarray | None,
    boxes_b: np.ndarray,
    labels_b: np.ndarray | None,
    *,
    iou: float = 0.5,
    scores_a: np.ndarray | None = None,
) -> list[tuple[int, int, float]]:
    """``match_boxes`` on arrays (labels None: any label matches)."""
    if not 0.0 < iou <= 1.0:
        raise InvalidInput(f"iou must be in (0, 1], got {iou}")
    ious = iou_matrix(boxes_a, boxes_b)
    if labels_a is not None and labels_b is not None:
        ious = np.where(np.asarray(labels_a)[:, None] == np.asarray(labels_b)[None, :], ious, 0.0)
    pairs = []
    if scores_a is not None:  # COCO's way: a's boxes by score, each takes its best free b
        free = np.ones(ious.shape[1], dtype=bool)
        for i in np.argsort(-np.asarray(scores_a, dtype=np.float64), kind="stable"):
            row = np.where(free, ious[i], -1.0)
            j = int(np.argmax(row)) if len(row) else -1
            if j >= 0 and row[j] >= iou:
                free[j] = False
                pairs.append((int(i), j, float(row[j])))
        return pairs
    # no scores: the pair that overlaps most first, then the next among the rest
    ii, jj = np.nonzero(ious >= iou)
    used_a, used_b = set(), set()
    for k in np.argsort(-ious[ii, jj], kind="stable"):
        i, j = int(ii[k]), int(jj[k])
        if i not in used_a and j not in used_b:
            used_a.add(i)
            used_b.add(j)
            pairs.append((i, j, float(ious[i, j])))
    return pairs


def _arrays(boxes: Sequence[dict[str, Any]]) -> tuple[np.ndarray, list[str], np.ndarray | None]:
    xyxy = np.array([b["box"] for b in boxes], dtype=np.float64).reshape(-1, 4)
    scores = [b.get("score") for b in boxes]
    has = bool(boxes) and all(s is not None for s in scores)
    return xyxy, [b["label"] for b in boxes], np.array(scores, dtype=np.float64) if has else None


def match_boxes(
    a: Sequence[dict[str, Any]],
    b: Sequence[dict[str, Any]],
    *,
    iou: float = 0.5,
    same_label: bool = True,
) -> list[tuple[int, int, float]]:
    """One-to-one matches ``(i, j, iou)`` between box lists ``a`` and ``b`` with IoU >= ``iou``.

    Greedy, like COCO: when every box of ``a`` has a score, a's boxes in score order each take
    the free box of ``b`` they overlap most (a detector's confident boxes claim first);
    otherwise the most-overlapping pair is taken first, then the next among the rest."""
    xa, la, sa = _arrays(a)
    xb, lb, _ = _arrays(b)
    if same_label:
        names = {c: k for k, c in enumerate(sorted(set(la) | set(lb)))}
        ia = np.array([names[c] for c in la], dtype=np.int64)
        ib = np.array([names[c] for c in lb], dtype=np.int64)
        return match_arrays(xa, ia, xb, ib, iou=iou, scores_a=sa)
    return match_arrays(xa, None, xb, None, iou=iou, scores_a=sa)


def agreement_arrays(
    boxes_a: np.ndarray,
    labels_a: np.ndarray,
    boxes_b: np.ndarray,
    labels_b: np.ndarray,
    *,
    iou: float = 0.5,
) -> float:
    """``agreement`` on arrays."""
    n = max(len(labels_a), len(labels_b))
    if n == 0:
        return 1.0
    return len(match_arrays(boxes_a, labels_a, boxes_b, labels_b, iou=iou)) / n


def agreement(
    a_boxes: Sequence[dict[str, Any]], b_boxes: Sequence[dict[str, Any]], *, iou: float = 0.5
) -> float:
    """Share of boxes the two lists agree on: pairs with the same label and IoU >= ``iou``
    (matched one-to-one, most-overlapping first, scores ignored) over the longer list's
    length; 1.0 when both are empty. Symmetric, so it serves inter-annotator agreement and
    "where do two model versions disagree" alike: a missed or extra box, a wrong label or a
    box that moved off all lower it."""
    if not a_boxes and not b_boxes:
        return 1.0
    strip = [[{k: v for k, v in x.items() if k != "score"} for x in s] for s in (a_boxes, b_boxes)]
    return len(match_boxes(strip[0], strip[1], iou=iou)) / max(len(a_boxes), len(b_boxes))

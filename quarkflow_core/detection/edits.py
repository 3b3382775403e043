"""What an expert's edit of a detection on the image means, box by box.

The demo draws a detection's shown boxes on the image (``gradio_image_annotation``); the
expert moves, resizes, relabels or deletes them and draws the objects the model missed. What
comes back is only the boxes left on the image, without ids (the annotator keeps none), so
each predicted box is matched to what is left by position: first the boxes still where they
were (within ``tol`` pixels: the annotator rounds to whole pixels), then by best IoU (at least
``iou``). :func:`verdicts_from_edit` turns that into the ``(verdict, boxes, missed)`` that
``PredictionService.feedback`` takes (``detection.feedback`` has the rules)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from quarkflow_core.errors import InvalidInput

MATCH_IOU = 0.3  # a moved box still overlapping its old place this much is the same object
SAME_PLACE_PX = 1.0  # the annotator returns whole pixels; predicted boxes have 0.01 px
CAPTION = re.compile(r"^(?P<label>.*) \d{1,3}%$")


def caption(label: str, score: float) -> str:
    """The text drawn on a predicted box: its label and score, e.g. ``7 93%`` (as
    ``draw.box_caption`` writes it on the workbench's pictures)."""
    return f"{label} {score:.0%}"


def caption_label(text: str, classes: Sequence[str]) -> str:
    """The label of a box's caption: the text itself when it is a class (the expert picked
    it), else the label of a :func:`caption` ("" for a box drawn without a label)."""
    text = (text or "").strip()
    if text in classes:
        return text
    found = CAPTION.match(text)
    return found.group("label") if found else text


def to_annotator(predicted: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """A prediction's shown boxes in the annotator's format, captioned with label and score
    (it hands the edges back rounded to whole pixels)."""
    return [
        {
            "label": caption(b["label"], float(b.get("score", 1.0))),
            "xmin": b["box"][0],
            "ymin": b["box"][1],
            "xmax": b["box"][2],
            "ymax": b["box"][3],
        }
        for b in predicted
        if b.get("shown", True)
    ]


def from_annotator(boxes: Sequence[dict[str, Any]], classes: Sequence[str]) -> list[dict[str, Any]]:
    """The annotator's boxes as ``{"label", "box"}`` (label "" where the expert gave none)."""
    return [
        {
            "label": caption_label(str(b.get("label") or ""), classes),
            "box": [float(b["xmin"]), float(b["ymin"]), float(b["xmax"]), float(b["ymax"])],
        }
        for b in boxes
    ]


def _pairs(
    predicted: list[tuple[int, dict[str, Any]]],
    edited: list[dict[str, Any]],
    *,
    iou: float,
    tol: float,
) -> dict[int, int]:
    """Predicted index -> edited position, one to one: unmoved boxes first, then the best IoU
    (ties: the same label, then the earlier box)."""
    from quarkflow_core.detection.boxes import iou_matrix

    if not predicted or not edited:
        return {}
    a = np.array([b["box"] for _, b in predicted], dtype=np.float64)
    b = np.array([e["box"] for e in edited], dtype=np.float64)
    overlap = iou_matrix(a, b)
    unmoved = np.abs(a[:, None, :] - b[None, :, :]).max(axis=2) <= tol
    candidates = [
        (not unmoved[i, j], -overlap[i, j], predicted[i][1]["label"] != edited[j]["label"], i, j)
        for i in range(len(predicted))
        for j in range(len(edited))
        if unmoved[i, j] or overlap[i, j] >= iou
    ]
    out: dict[int, int] = {}
    taken: set[int] = set()
    for *_, i, j in sorted(candidates):
        index = predicted[i][0]
        if index not in out and j not in taken:
            out[index] = j
            taken.add(j)
    return out


def verdicts_from_edit(
    predicted: list[dict[str, Any]],
    edited: list[dict[str, Any]],
    *,
    iou: float = MATCH_IOU,
    tol: float = SAME_PLACE_PX,
) -> tuple[str, list[dict[str, Any]], list[dict[str, Any]]]:
    """``(verdict, boxes, missed)`` for ``PredictionService.feedback`` from a detection's
    boxes (``predicted``: the prediction's list as returned, each box's ``index`` its position
    there; only ``shown`` ones were on the image) and the boxes the expert left on the image
    (``edited``: ``{"label", "box"}``, with ``index`` when the editor kept which predicted box
    it is; else they are matched by position, see the module). Per shown box: still there
    unchanged -> ``correct``; same place, other label -> ``wrong_label``; moved or resized ->
    ``bad_box`` with the new box (and the label when it changed); gone -> ``not_object``.
    Every other edited box is a missed object. Nothing changed: ``("correct", [], [])``."""
    shown = [(i, b) for i, b in enumerate(predicted) if b.get("shown", True)]
    for k, e in enumerate(edited):
        if not str(e.get("label") or "").strip():
            raise InvalidInput(
                f"box {k + 1} on the image has no label: pick its label (or delete it)",
                code="unlabeled_box",
            )
    by_index = {e["index"]: k for k, e in enumerate(edited) if e.get("index") is not None}
    unknown = sorted(set(by_index) - {i for i, _ in shown})
    if unknown:
        raise InvalidInput(f"edited boxes name predicted boxes {unknown} that were not shown")
    free = [k for k, e in enumerate(edited) if e.get("index") is None]
    matched = dict(by_index)
    matched |= {
        i: free[j]
        for i, j in _pairs(
            [(i, b) for i, b in shown if i not in by_index],
            [edited[k] for k in free],
            iou=iou,
            tol=tol,
        ).items()
    }
    boxes: list[dict[str, Any]] = []
    for i, b in shown:
        if i not in matched:
            boxes.append({"index": i, "verdict": "not_object"})
            continue
        now = edited[matched[i]]
        moved = max(abs(float(p) - float(q)) for p, q in zip(b["box"], now["box"], strict=True))
        if moved > tol:
            entry = {"index": i, "verdict": "bad_box", "box": [float(v) for v in now["box"]]}
            if now["label"] != b["label"]:
                entry["label"] = now["label"]
            boxes.append(entry)
        elif now["label"] != b["label"]:
            boxes.append({"index": i, "verdict": "wrong_label", "label": now["label"]})
        else:
            boxes.append({"index": i, "verdict": "correct"})
    used = set(matched.values())
    missed = [
        {"label": e["label"], "box": [float(v) for v in e["box"]]}
        for k, e in enumerate(edited)
        if k not in used
    ]
    if not missed and all(e["verdict"] == "correct" for e in boxes):
        return "correct", [], []
    return "wrong", boxes, missed

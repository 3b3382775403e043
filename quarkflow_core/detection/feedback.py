"""An expert's verdict on a detection, box by box, and the ground truth it implies.

A detection prediction stores the boxes the model found (``predictions.boxes``), each with
``shown``: whether its score reached the model's threshold, so the expert saw it. The expert
answers either **correct** (accept all: every shown box is right and nothing is missing) or
**wrong** with, per shown box (by its index in the stored list; a box not mentioned is
right):

* ``correct``;
* ``wrong_label`` and the right ``label``;
* ``bad_box``: the object is there but the box is off; with a corrected ``box`` (and
  optionally ``label``) it becomes that box, without one an annotator must draw it;
* ``not_object``: nothing there;

and the boxes they drew for **missed** objects (``label`` + ``box``). ``wrong`` with nothing
said sends the image to review (someone must say what is wrong)."""

from __future__ import annotations

from typing import Any

from quarkflow_core.errors import InvalidInput
from quarkflow_core.schema import Verdict

BOX_VERDICTS = ("correct", "wrong_label", "bad_box", "not_object")
MISSED = "missed"
MAX_MISSED = 100
UNKNOWN_SIZE = 1 << 16


def _check_box(raw: Any, *, where: str, width: int | None, height: int | None) -> list[float]:
    from quarkflow_core.detection.boxes import parse_boxes

    # the image's size is unknown only for a prediction still in the outbox during an outage
    parsed = parse_boxes(
        [{"label": "_", "box": raw}],
        width=width or UNKNOWN_SIZE,
        height=height or UNKNOWN_SIZE,
        classes=["_"],
        scored=False,
    )
    if not parsed:
        raise InvalidInput(f"{where}: not a box")
    return parsed[0]["box"]


def _check_label(label: Any, *, where: str, classes: list[str]) -> str:
    if not isinstance(label, str) or label not in classes:
        raise InvalidInput(
            f"{where}: unknown label {label!r}; valid labels: {', '.join(classes)}",
            code="unknown_label",
        )
    return label


def check_box_feedback(
    *,
    verdict: Verdict,
    predicted: list[dict[str, Any]],
    boxes: list[dict[str, Any]] | None,
    missed: list[dict[str, Any]] | None,
    classes: list[str],
    width: int | None = None,
    height: int | None = None,
) -> list[dict[str, Any]]:
    """Validate what an expert said about a detection's boxes; the normalised list that
    ``feedback.boxes`` stores (entries by index, then the missed boxes)."""
    boxes, missed = list(boxes or []), list(missed or [])
    if verdict == Verdict.CORRECT and (
        missed or any(e.get("verdict", "correct") != "correct" for e in boxes)
    ):
        raise InvalidInput(
            "verdict 'correct' accepts every shown box; a box verdict other than 'correct' "
            "or a missed object needs verdict 'wrong'"
        )
    if len(missed) > MAX_MISSED:
        raise InvalidInput(f"too many missed boxes: {len(missed)} > {MAX_MISSED}")
    out: list[dict[str, Any]] = []
    seen: set[int] = set()
    for k, entry in enumerate(boxes):
        where = f"boxes[{k}]"
        if not isinstance(entry, dict):
            raise InvalidInput(f"{where}: must be an object with index and verdict")
        index = entry.get("index")
        if isinstance(index, bool) or not isinstance(index, int):
            raise InvalidInput(f"{where}: index must be an integer")
        if not 0 <= index < len(predicted):
            raise InvalidInput(
                f"{where}: index {index} out of range; the prediction has {len(predicted)} boxes"
            )
        if index in seen:
            raise InvalidInput(f"{where}: box {index} has two verdicts")
        seen.add(index)
        v = entry.get("verdict")
        if v not in BOX_VERDICTS:
            raise InvalidInput(f"{where}: verdict must be one of {', '.join(BOX_VERDICTS)}")
        item: dict[str, Any] = {"index": index, "verdict": v}
        if v == "wrong_label":
            label = _check_label(entry.get("label"), where=where, classes=classes)
            if label == predicted[index]["label"]:
                raise InvalidInput(f"{where}: wrong_label names the predicted label {label!r}")
            item["label"] = label
        if v == "bad_box":
            if entry.get("box") is not None:
                item["box"] = _check_box(entry["box"], where=where, width=width, height=height)
            if entry.get("label") is not None:
                item["label"] = _check_label(entry["label"], where=where, classes=classes)
        out.append(item)
    for k, entry in enumerate(missed):
        where = f"missed[{k}]"
        if not isinstance(entry, dict):
            raise InvalidInput(f"{where}: must be an object with label and box")
        out.append(
            {
                "verdict": MISSED,
                "label": _check_label(entry.get("label"), where=where, classes=classes),
                "box": _check_box(entry.get("box"), where=where, width=width, height=height),
            }
        )
    return out


def implied_truth(
    *, verdict: Verdict, predicted: list[dict[str, Any]], said: list[dict[str, Any]] | None
) -> list[dict[str, Any]] | None:
    """The ground-truth boxes an expert's answer implies, or None when it does not say
    enough (``wrong`` with nothing said, or a bad box without its correction)."""
    said = list(said or [])
    if verdict == Verdict.WRONG and not said:
        return None
    by_index = {e["index"]: e for e in said if "index" in e}
    truth: list[dict[str, Any]] = []
    for i, box in enumerate(predicted):
        entry = by_index.get(i)
        if entry is None:
            if box.get("shown", True):
                truth.append({"label": box["label"], "box": list(box["box"])})
            continue
        v = entry["verdict"]
        if v == "correct":
            truth.append({"label": box["label"], "box": list(box["box"])})
        elif v == "wrong_label":
            truth.append({"label": entry["label"], "box": list(box["box"])})
        elif v == "bad_box":
            if "box" not in entry:
                return None
            truth.append({"label": entry.get("label", box["label"]), "box": list(entry["box"])})
    truth += [{"label": e["label"], "box": list(e["box"])} for e in said if e["verdict"] == MISSED]
    return truth

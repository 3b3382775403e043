"""Boxes drawn on an image, for people: the workbench's predictions, review queue, data sets
and model comparison, and the screenshots in the docs.

Boxes are the contract's dicts (``{"label", "box": [x1, y1, x2, y2]}`` in the image's own
pixels, maybe ``"score"``, ``"shown"``, ``"verdict"``). Small images (the synthetic digits are
a few hundred pixels) are enlarged first so the labels stay legible at the size a page shows
them; the boxes are scaled with the image. Colours come from one palette: by class (the same
digit always has the same colour), by where the box comes from (version A, version B, the
ground truth, what people settled) or by an expert's verdict on it.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
from PIL import Image as PILImage
from PIL import ImageDraw, ImageFont

from quarkflow_core.errors import InvalidInput

RGB = tuple[int, int, int]
# Tableau 10: distinct on photos and for most colour-blind eyes
PALETTE: tuple[RGB, ...] = (
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
)
SOURCE_COLOURS: dict[str, RGB] = {
    "a": (31, 119, 180),  # the reference version: blue
    "b": (255, 127, 14),  # the candidate: orange
    "model": (31, 119, 180),
    "resolved": (44, 160, 44),  # what people settled: green
    "truth": (245, 245, 245),  # ground truth: near white, drawn dashed
}
VERDICT_COLOURS: dict[str, RGB] = {
    "correct": (44, 160, 44),
    "wrong_label": (255, 127, 14),
    "bad_box": (255, 187, 0),
    "corrected": (23, 190, 207),
    "not_object": (214, 39, 40),
    "missed": (148, 103, 189),
    "unjudged": (127, 127, 127),
}
VERDICT_WORDS = {
    "correct": "correct",
    "wrong_label": "wrong label",
    "bad_box": "box off",
    "corrected": "corrected box",
    "not_object": "not an object",
    "missed": "missed",
    "unjudged": "no verdict",
}
ColourBy = Literal["label", "source", "verdict"]
MIN_SIDE = 384  # px: smaller images are enlarged so a 12 px label stays readable
DASH = 5


def label_colour(label: str, classes: Sequence[str] | None = None) -> RGB:
    """A class's colour: by its index in ``classes`` when given, else by the label itself
    (digits map to their value, so "7" is the same colour on every page)."""
    if classes is not None and label in classes:
        return PALETTE[list(classes).index(label) % len(PALETTE)]
    if label.isdigit():
        return PALETTE[int(label) % len(PALETTE)]
    return PALETTE[sum(map(ord, label)) % len(PALETTE)]


def as_image(image: Any) -> PILImage.Image:
    """An RGB copy of ``image``: encoded bytes, a PIL image or a uint8 (H, W, 3) array."""
    if isinstance(image, bytes | bytearray | memoryview):
        img = PILImage.open(io.BytesIO(bytes(image)))
        img.load()
    elif isinstance(image, PILImage.Image):
        img = image
    elif isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3):
            raise InvalidInput(f"need a uint8 (H, W[, 3]) array, got {image.dtype} {image.shape}")
        img = PILImage.fromarray(image)
    else:
        raise InvalidInput(f"cannot draw on a {type(image).__name__}")
    return img.convert("RGB")


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def _ink_on(colour: RGB) -> RGB:
    """Black or white text, whichever reads better on ``colour``."""
    r, g, b = colour
    return (0, 0, 0) if 0.299 * r + 0.587 * g + 0.114 * b > 150 else (255, 255, 255)


def _dashed_rectangle(draw: ImageDraw.ImageDraw, xy: Sequence[float], colour: RGB, width: int):
    x1, y1, x2, y2 = xy
    for a, b, horizontal, fixed in (
        (x1, x2, True, y1),
        (x1, x2, True, y2),
        (y1, y2, False, x1),
        (y1, y2, False, x2),
    ):
        pos = a
        while pos < b:
            end = min(pos + DASH, b)
            if horizontal:
                draw.line([(pos, fixed), (end, fixed)], fill=colour, width=width)
            else:
                draw.line([(fixed, pos), (fixed, end)], fill=colour, width=width)
            pos += 2 * DASH


def box_caption(box: dict[str, Any], *, scores: bool = True) -> str:
    """The text next to a box: its label, its score (as a percentage) and a verdict's gist."""
    text = str(box.get("label", ""))
    verdict = box.get("verdict")
    if scores and box.get("score") is not None:
        text += f" {float(box['score']):.0%}"
    if verdict == "wrong_label" and box.get("said"):
        text += f" (is {box['said']})"  # the default font has no arrow
    elif verdict in ("not_object", "missed", "bad_box"):
        text += f" ({VERDICT_WORDS[verdict]})"
    return text


def _colour(box: dict[str, Any], colour_by: ColourBy, source: str | None, classes) -> RGB:
    if colour_by == "label":
        return label_colour(str(box.get("label", "")), classes)
    if colour_by == "source":
        key = box.get("source", source)
        if key not in SOURCE_COLOURS:
            raise InvalidInput(f"unknown box source {key!r}; valid: {', '.join(SOURCE_COLOURS)}")
        return SOURCE_COLOURS[key]
    if colour_by == "verdict":
        return VERDICT_COLOURS[box.get("verdict") or "unjudged"]
    raise InvalidInput(f"colour_by must be label, source or verdict, not {colour_by!r}")


def draw_boxes(
    image: Any,
    boxes: Sequence[dict[str, Any]] | None,
    *,
    colour_by: ColourBy = "label",
    source: str | None = None,
    classes: Sequence[str] | None = None,
    only_shown: bool = True,
    scores: bool = True,
    labels: bool = True,
    truth: Sequence[dict[str, Any]] | None = None,
    min_side: int = MIN_SIDE,
    width: int | None = None,
    label_px: int | None = None,
) -> PILImage.Image:
    """``image`` with ``boxes`` drawn (a new image; enlarged to ``min_side`` when smaller).

    ``colour_by``: "label" (a colour per class), "source" (the box's ``"source"`` key, else
    ``source``: "a", "b", "model", "resolved", "truth") or "verdict" (the box's ``"verdict"``,
    see ``boxes_with_verdicts``). ``only_shown`` leaves out boxes with ``"shown": False`` (the
    model logged them but scored them under its threshold, so nobody saw them); drawn, they are
    dashed, like a verdict's "not an object" or "box off". ``truth``, when
    given, is drawn first as thin dashed outlines, so a model's boxes can be judged against it.
    ``width`` and ``label_px``: line width and label height in px of the drawn (maybe
    enlarged) image; by default a fixed share of its size, which suits an image shown a few
    hundred pixels wide (pass smaller ones for a bigger display)."""
    img = as_image(image)
    scale = max(1.0, min_side / max(1, min(img.size)))
    if scale > 1.0:
        size = (round(img.width * scale), round(img.height * scale))
        img = img.resize(size, PILImage.Resampling.LANCZOS)
    line = width or max(2, round(min(img.size) / 160))
    font = _font(label_px or max(12, round(min(img.size) / 16)))
    draw = ImageDraw.Draw(img)

    def xy(b: dict[str, Any]) -> list[float]:
        x1, y1, x2, y2 = (float(v) * scale for v in b["box"])
        return [x1, y1, max(x1 + 1, x2 - 1), max(y1 + 1, y2 - 1)]  # x2, y2 exclusive

    for b in truth or []:
        _dashed_rectangle(draw, xy(b), SOURCE_COLOURS["truth"], max(1, line - 1))
    kept = [b for b in boxes or [] if not only_shown or b.get("shown", True)]
    # the most confident last, so their labels are drawn on top
    kept.sort(key=lambda b: b.get("score") if b.get("score") is not None else 2.0)
    for b in kept:
        colour = _colour(b, colour_by, source, classes)
        rect = xy(b)
        if b.get("verdict") in ("not_object", "bad_box") or not b.get("shown", True):
            _dashed_rectangle(draw, rect, colour, line)
        else:
            draw.rectangle(rect, outline=colour, width=line)
        if not labels:
            continue
        text = box_caption(b, scores=scores)
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        tw, th = right - left, bottom - top
        tx = min(max(rect[0], 0), max(0, img.width - tw - 4))
        ty = rect[1] - th - 4 if rect[1] - th - 4 >= 0 else rect[1]
        draw.rectangle([tx, ty, tx + tw + 4, ty + th + 4], fill=colour)
        draw.text((tx + 2 - left, ty + 2 - top), text, fill=_ink_on(colour), font=font)
    return img


def boxes_with_verdicts(
    predicted: Sequence[dict[str, Any]],
    said: Sequence[dict[str, Any]] | None,
    *,
    verdict: str | None,
) -> list[dict[str, Any]]:
    """The predicted boxes an expert saw (``shown``), each with the ``verdict`` they gave it
    (``quarkflow_core.detection.feedback``: a box not mentioned is correct once there is a
    verdict; "unjudged" without one), a wrong label's right one as ``said``, a bad box's
    correction and the boxes drawn for missed objects: for ``draw_boxes(colour_by="verdict")``
    and for a legend."""
    said = list(said or [])
    by_index = {e["index"]: e for e in said if "index" in e}
    out: list[dict[str, Any]] = []
    for i, box in enumerate(predicted):
        if not box.get("shown", True):
            continue
        entry = by_index.get(i)
        v = entry["verdict"] if entry else ("correct" if verdict else "unjudged")
        row = {**box, "verdict": v}
        if entry and v == "wrong_label":
            row["said"] = entry["label"]
        out.append(row)
        if entry and v == "bad_box" and entry.get("box") is not None:
            out.append(
                {
                    "label": entry.get("label", box["label"]),
                    "box": list(entry["box"]),
                    "verdict": "corrected",
                }
            )
    out += [
        {"label": e["label"], "box": list(e["box"]), "verdict": "missed"}
        for e in said
        if e.get("verdict") == "missed"
    ]
    return out


def shown_summary(boxes: Sequence[dict[str, Any]] | None) -> str:
    """ "no boxes", "1 box", "3 boxes": how many of a detection's boxes were shown (scored at
    or over the model's threshold)."""
    n = sum(1 for b in boxes or [] if b.get("shown", True))
    return "no boxes" if n == 0 else "1 box" if n == 1 else f"{n} boxes"


def verdict_counts(boxes: Sequence[dict[str, Any]]) -> dict[str, int]:
    """How many boxes got each verdict (``boxes_with_verdicts``' output), in the legend's order."""
    counts = {k: 0 for k in VERDICT_COLOURS}
    for b in boxes:
        counts[b.get("verdict") or "unjudged"] += 1
    return {k: n for k, n in counts.items() if n}


def side_by_side(
    panels: Sequence[tuple[str, PILImage.Image]],
    *,
    gap: int = 8,
    background: RGB = (255, 255, 255),
) -> PILImage.Image:
    """Images next to each other, each under its title (e.g. "v1" and "v2")."""
    if not panels:
        raise InvalidInput("nothing to put side by side")
    height = max(img.height for _, img in panels)
    font = _font(max(14, round(height / 13)))
    probe = ImageDraw.Draw(PILImage.new("RGB", (1, 1)))
    title_h = max(probe.textbbox((0, 0), t or " ", font=font)[3] for t, _ in panels) + 8
    total = sum(img.width for _, img in panels) + gap * (len(panels) - 1)
    out = PILImage.new("RGB", (total, height + title_h), background)
    draw = ImageDraw.Draw(out)
    x = 0
    for title, img in panels:
        draw.text((x + 2, 2), title, fill=(30, 30, 30), font=font)
        out.paste(img, (x, title_h))
        x += img.width + gap
    return out


def compare_boxes(
    image: Any,
    boxes_a: Sequence[dict[str, Any]],
    boxes_b: Sequence[dict[str, Any]],
    *,
    titles: tuple[str, str] = ("A", "B"),
    truth: Sequence[dict[str, Any]] | None = None,
    min_side: int = MIN_SIDE,
) -> PILImage.Image:
    """One image twice, side by side: A's boxes (blue) on the left, B's (orange) on the right,
    the ground truth dashed under both when given."""
    left = draw_boxes(
        image, boxes_a, colour_by="source", source="a", truth=truth, min_side=min_side
    )
    right = draw_boxes(
        image, boxes_b, colour_by="source", source="b", truth=truth, min_side=min_side
    )
    return side_by_side([(titles[0], left), (titles[1], right)])


def png_bytes(img: PILImage.Image) -> bytes:
    """``img`` encoded as PNG (what st.image and data URIs take)."""
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False)
    return buf.getvalue()

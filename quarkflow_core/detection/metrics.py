"""Detection metrics: COCO mAP from torchmetrics for the numbers we report, and a fast numpy AP
for resampling.

``evaluate_detections`` is the hold-out report: torchmetrics' ``MeanAveragePrecision`` (COCO
rules, the faster_coco_eval backend) gives mAP, mAP@0.5/0.75, mAP by size, mAR and AP per class;
beside them the precision-recall curves, the counts per size bucket and precision/recall/F1 at
the score threshold the model ships with, all JSON-safe (None where COCO says -1 or NaN).

A paired bootstrap (``compare.py``) needs mAP for a thousand resamples of images; COCOeval
takes a good fraction of a second each time. ``image_stats`` matches one image's boxes once,
exactly as COCOeval does (greedy by score, at IoU 0.50:0.95, per size range, at most 100 boxes
per class), and ``map_from_stats`` / ``resampled_map`` pool those matches for any multiset of
images and compute COCO's 101-point interpolated AP from them, in milliseconds.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from quarkflow_core.detection.boxes import iou_matrix
from quarkflow_core.detection.synth import LARGE_AREA, SMALL_AREA
from quarkflow_core.errors import InvalidInput

AREAS = ("all", "small", "medium", "large")
# COCOeval's areaRng: the bounds are inclusive on both sides, as there
AREA_RANGES = ((0.0, 1e10), (0.0, float(SMALL_AREA)), (float(SMALL_AREA), float(LARGE_AREA)))
AREA_RANGES += ((float(LARGE_AREA), 1e10),)
MAX_DETS = 100  # COCO's maxDets for AP: per image and class
# torchmetrics' summary numbers a report carries (and a comparison puts side by side)
MAP_KEYS = (
    "map",
    "map_50",
    "map_75",
    "map_small",
    "map_medium",
    "map_large",
    "mar_1",
    "mar_10",
    "mar_100",
    "mar_small",
    "mar_medium",
    "mar_large",
)
CURVE_POINTS = 101  # recall grid of the precision-recall curves (COCO's recThrs)
CHUNK = 2_000_000  # float64 elements per resample chunk: ~16 MB a temporary array
DECIMALS = 6  # torchmetrics reports float32; more digits are noise


@functools.cache
def coco_thresholds() -> tuple[np.ndarray, np.ndarray]:
    """COCO's IoU thresholds (0.50:0.05:0.95) and recall grid (0:0.01:1) exactly as
    torchmetrics passes them to COCOeval (float32 ``torch.linspace`` values), so our AP
    agrees with its AP to the last digit, not just to a rounding at a grid point."""
    import torch

    ious = np.array(torch.linspace(0.5, 0.95, 10).tolist(), dtype=np.float64)
    recalls = np.array(torch.linspace(0.0, 1.0, CURVE_POINTS).tolist(), dtype=np.float64)
    return ious, recalls


def json_number(x: Any) -> float | None:
    """A metric as a JSON-safe float: COCO's -1 ("undefined") and NaN become None."""
    v = float(x)
    return None if math.isnan(v) or v == -1.0 else round(v, DECIMALS)


def _array(x: Any, dtype: Any, shape: tuple[int, ...], what: str) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor, maybe on the GPU
        x = x.detach().cpu().numpy()
    out = np.asarray(x if x is not None else [], dtype=dtype)
    if out.size == 0:
        return out.reshape((0, *shape[1:]))
    if out.ndim != len(shape) or out.shape[1:] != shape[1:]:
        raise InvalidInput(f"{what} must have shape {('k', *shape[1:])}, got {out.shape}")
    return out


def validated_detections(
    preds: Sequence[dict[str, Any]],
    truths: Sequence[dict[str, Any]],
    n_classes: int | None,
) -> tuple[list[dict[str, np.ndarray]], list[dict[str, np.ndarray]]]:
    """Predictions and ground truth as numpy dicts, with every inconsistency refused by name
    (a mismatch would otherwise surface as a wrong mAP, not an error)."""
    if len(preds) != len(truths):
        raise InvalidInput(f"{len(preds)} predictions for {len(truths)} images; need one each")
    if not truths:
        raise InvalidInput("no images to evaluate")
    out_p, out_t = [], []
    for i, (p, t) in enumerate(zip(preds, truths, strict=True)):
        missing = [k for k in ("boxes", "scores", "labels") if k not in p]
        if missing:
            raise InvalidInput(f"image {i}: prediction lacks {', '.join(missing)}")
        if "boxes" not in t or "labels" not in t:
            raise InvalidInput(f"image {i}: ground truth needs boxes and labels")
        pb = _array(p["boxes"], np.float32, (0, 4), f"image {i}: predicted boxes")
        # float32 like torchmetrics holds them, so both rank equal scores alike
        ps = _array(p["scores"], np.float32, (0,), f"image {i}: scores").astype(np.float64)
        pl = _array(p["labels"], np.int64, (0,), f"image {i}: predicted labels")
        tb = _array(t["boxes"], np.float32, (0, 4), f"image {i}: true boxes")
        tl = _array(t["labels"], np.int64, (0,), f"image {i}: true labels")
        if not len(pb) == len(ps) == len(pl):
            raise InvalidInput(
                f"image {i}: {len(pb)} boxes, {len(ps)} scores, {len(pl)} labels predicted"
            )
        if len(tb) != len(tl):
            raise InvalidInput(f"image {i}: {len(tb)} true boxes but {len(tl)} labels")
        for what, labels in (("predicted", pl), ("true", tl)):
            bad = labels[(labels < 0) | (labels >= (n_classes or np.iinfo(np.int64).max))]
            if len(bad):
                raise InvalidInput(
                    f"image {i}: {what} label {int(bad[0])} is not a class index"
                    + (f" (0..{n_classes - 1})" if n_classes else "")
                )
        for what, boxes in (("predicted", pb), ("true", tb)):
            if not np.isfinite(boxes).all():
                raise InvalidInput(f"image {i}: a {what} box is not finite")
        if not np.isfinite(ps).all():
            raise InvalidInput(f"image {i}: a score is not finite")
        out_p.append({"boxes": pb, "scores": ps, "labels": pl})
        out_t.append({"boxes": tb, "labels": tl})
    return out_p, out_t


def _areas(boxes: np.ndarray) -> np.ndarray:
    """Box areas as COCO sees them through torchmetrics: float32 width times height."""
    w = boxes[:, 2] - boxes[:, 0]
    h = boxes[:, 3] - boxes[:, 1]
    return w.astype(np.float64) * h.astype(np.float64)


def _outside(areas: np.ndarray) -> np.ndarray:
    """(A, n): whether each area falls outside each of COCO's size ranges."""
    lo = np.array([r[0] for r in AREA_RANGES])[:, None]
    hi = np.array([r[1] for r in AREA_RANGES])[:, None]
    return (areas[None, :] < lo) | (areas[None, :] > hi)


@dataclass(frozen=True)
class ImageStats:
    """One image's predictions matched to its ground truth, COCO-style, for every IoU
    threshold (T) and size range (A: all, small, medium, large): what AP needs from the image,
    so any resample of images can be scored without matching again.

    Detections are the at most ``MAX_DETS`` best-scored per class, grouped by class, each
    group in COCO's order (score descending, stable)."""

    labels: np.ndarray  # int64 (d,)
    scores: np.ndarray  # float64 (d,)
    matched: np.ndarray  # bool (A, T, d): matched a ground-truth box counted in that range
    ignored: np.ndarray  # bool (A, T, d): neither a hit nor a false alarm in that range
    truth_labels: np.ndarray  # int64 (g,)
    truth_counted: np.ndarray  # bool (A, g): inside that size range
    iou_thresholds: np.ndarray  # float64 (T,)


def _match_class(
    ious: np.ndarray, gt_ignore: np.ndarray, thresholds: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """COCOeval.evaluateImg's greedy matching for one class of one image, for all size ranges
    and IoU thresholds at once: each detection (in score order) takes the free ground-truth
    box it overlaps most, at IoU >= the threshold, preferring boxes counted in the range (the
    last of equal IoUs, as COCO's loop does). Returns (hit, hit_ignored), bool (A, T, d)."""
    n_dt, n_gt = ious.shape
    a, t = gt_ignore.shape[0], len(thresholds)
    hit = np.zeros((a, t, n_dt), dtype=bool)
    hit_ignored = np.zeros((a, t, n_dt), dtype=bool)
    if n_gt == 0:
        return hit, hit_ignored
    free = np.ones((a, t, n_gt), dtype=bool)
    limit = np.minimum(thresholds, 1 - 1e-10)[None, :, None]
    counted = ~gt_ignore[:, None, :]
    rows = np.arange(a)[:, None]
    for k in range(n_dt):
        ok = free & (ious[k][None, None, :] >= limit)
        pref = ok & counted
        use = np.where(pref.any(-1, keepdims=True), pref, ok)
        val = np.where(use, ious[k][None, None, :], -1.0)
        j = n_gt - 1 - np.argmax(val[..., ::-1], axis=-1)  # (A, T): the last best
        got = use.any(-1)
        hit[..., k] = got
        hit_ignored[..., k] = got & gt_ignore[rows, j]
        free[rows, np.arange(t)[None, :], j] &= ~got
    return hit, hit_ignored


def image_stats(
    pred: dict[str, Any],
    truth: dict[str, Any],
    *,
    iou_thresholds: Sequence[float] | None = None,
    max_dets: int = MAX_DETS,
) -> ImageStats:
    """Match one image's predictions to its ground truth as COCOeval does (see
    ``ImageStats``); ``iou_thresholds`` defaults to COCO's ten."""
    (p,), (t,) = validated_detections([pred], [truth], None)
    thresholds = coco_thresholds()[0] if iou_thresholds is None else np.asarray(iou_thresholds)
    thresholds = thresholds.astype(np.float64).reshape(-1)
    gt_ignore_all = _outside(_areas(t["boxes"]))
    dt_outside_all = _outside(_areas(p["boxes"]))
    labels, scores, matched, ignored = [], [], [], []
    for c in np.unique(p["labels"]):
        idx = np.nonzero(p["labels"] == c)[0]
        idx = idx[np.argsort(-p["scores"][idx], kind="mergesort")][:max_dets]
        gidx = np.nonzero(t["labels"] == c)[0]
        # COCO puts a range's uncounted boxes last; the order only settles equal-IoU ties
        ious = iou_matrix(p["boxes"][idx], t["boxes"][gidx])
        hit, hit_ignored = _match_class(ious, gt_ignore_all[:, gidx], thresholds)
        labels.append(np.full(len(idx), c, dtype=np.int64))
        scores.append(p["scores"][idx])
        matched.append(hit & ~hit_ignored)
        ignored.append(hit_ignored | (~hit & dt_outside_all[:, None, idx]))
    n_t = len(thresholds)
    return ImageStats(
        labels=np.concatenate(labels) if labels else np.zeros(0, dtype=np.int64),
        scores=np.concatenate(scores) if scores else np.zeros(0),
        matched=np.concatenate(matched, -1) if matched else np.zeros((4, n_t, 0), dtype=bool),
        ignored=np.concatenate(ignored, -1) if ignored else np.zeros((4, n_t, 0), dtype=bool),
        truth_labels=t["labels"],
        truth_counted=~gt_ignore_all,
        iou_thresholds=thresholds,
    )


@dataclass(frozen=True)
class _ClassPool:
    """One class's detections over a list of images in COCO's accumulate order, ready to
    score any weighting of the images."""

    image: np.ndarray  # int (D,): which image each detection comes from
    hits: tuple[np.ndarray, ...]  # per IoU threshold: positions (into D) of the hits
    counted: np.ndarray | None  # bool (T, D): neither ignored; None when all are counted
    truths: np.ndarray  # float64 (N,): counted ground-truth boxes per image


def _pools(stats: Sequence[ImageStats], area: int) -> list[_ClassPool]:
    """Per class (every class with a detection or a true box): detections of all images,
    sorted by score as COCOeval.accumulate sorts them (stable, image order on ties).
    False alarms after a class's last hit are dropped: they cannot raise any point of the
    precision envelope, in any resample."""
    n = len(stats)
    labels = np.concatenate([s.labels for s in stats])
    scores = np.concatenate([s.scores for s in stats])
    image = np.repeat(np.arange(n), [len(s.labels) for s in stats])
    matched = np.concatenate([s.matched[area] for s in stats], axis=-1)
    ignored = np.concatenate([s.ignored[area] for s in stats], axis=-1)
    t_labels = np.concatenate([s.truth_labels for s in stats])
    t_image = np.repeat(np.arange(n), [len(s.truth_labels) for s in stats])
    t_counted = np.concatenate([s.truth_counted[area] for s in stats])
    pools = []
    for c in np.unique(np.concatenate([labels, t_labels])):
        sel = np.nonzero(labels == c)[0]
        sel = sel[np.argsort(-scores[sel], kind="mergesort")]
        hit = matched[:, sel]
        any_hit = np.nonzero(hit.any(0))[0]
        sel = sel[: int(any_hit[-1]) + 1 if len(any_hit) else 0]
        hit, skip = matched[:, sel], ignored[:, sel]
        truths = np.bincount(t_image[(t_labels == c) & t_counted], minlength=n).astype(float)
        pools.append(
            _ClassPool(
                image=image[sel],
                hits=tuple(np.nonzero(row)[0] for row in hit),
                counted=~skip if skip.any() else None,
                truths=truths,
            )
        )
    return pools


def _class_ap(pool: _ClassPool, weights: np.ndarray) -> np.ndarray:
    """COCO's 101-point interpolated AP of one class for each row of ``weights`` (B, N)
    (how often each image is drawn): (B, T), NaN where the draw has no true box of the class.

    Two shortcuts, both exact. A detection drawn w times is one point of the curve with w
    hits or false alarms: the points in between never change the interpolated precision
    (along copies of a hit precision and recall both rise; along false alarms the recall
    stays). And the interpolated precision at a recall is the best precision at a hit at
    or after it (a false alarm never beats the hit before it), so only hits are points; the
    false alarms before each enter as a count. Hits are few, so a thousand resamples cost
    little more than one cumulative sum per class over all its detections."""
    recall_grid = coco_thresholds()[1]
    n_t = len(pool.hits)
    npig = weights @ pool.truths  # (B,)
    ap = np.full((len(weights), n_t), np.nan)
    has = npig > 0
    if not has.any():
        return ap
    w = weights[has][:, pool.image]  # (b, D)
    counted = np.cumsum(w, axis=-1) if pool.counted is None else None
    out = np.zeros((int(has.sum()), n_t))
    for t, pos in enumerate(pool.hits):
        if len(pos) == 0:
            continue  # AP 0
        seen = counted if counted is not None else np.cumsum(w * pool.counted[t], axis=-1)
        tps = np.cumsum(w[:, pos], axis=-1)
        recall = tps / npig[has][:, None]
        precision = tps / (seen[:, pos] + np.spacing(1))
        envelope = np.maximum.accumulate(precision[:, ::-1], axis=-1)[:, ::-1]
        reached = np.searchsorted(recall_grid, recall, side="right")  # grid points <= recall
        steps = np.diff(reached, axis=-1, prepend=0)
        out[:, t] = (envelope * steps).sum(-1) / len(recall_grid)
    ap[has] = out
    return ap


def _mean(x: np.ndarray, axis: tuple[int, ...]) -> np.ndarray:
    """nanmean without the all-NaN warning (NaN stays NaN)."""
    ok = ~np.isnan(x)
    count = ok.sum(axis=axis)
    total = np.where(ok, x, 0.0).sum(axis=axis)
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def _ap_table(pools: list[_ClassPool], weights: np.ndarray) -> np.ndarray:
    """(B, K, T) AP per resample, class and IoU threshold, in chunks of resamples that keep
    the temporaries near ``CHUNK`` elements."""
    n_b = len(weights)
    n_t = len(pools[0].hits) if pools else 1
    out = np.full((n_b, len(pools), n_t), np.nan)
    longest = max((len(p.image) for p in pools), default=1)
    step = max(1, CHUNK // max(n_t * longest, 1))
    for lo in range(0, n_b, step):
        for k, pool in enumerate(pools):
            out[lo : lo + step, k] = _class_ap(pool, weights[lo : lo + step])
    return out


def _summary(table: np.ndarray) -> dict[str, np.ndarray]:
    """mAP (mean over classes and thresholds), mAP@0.5 and mAP@0.75 from a (B, K, T) table."""
    ious = coco_thresholds()[0]
    out = {"map": _mean(table, (1, 2))}
    for key, iou in (("map_50", 0.5), ("map_75", 0.75)):
        hits = np.nonzero(np.isclose(ious, iou))[0]
        if table.shape[2] == len(ious) and len(hits):
            out[key] = _mean(table[:, :, hits[0]], (1,))
    return out


def resampled_map(stats: Sequence[ImageStats], weights: np.ndarray) -> dict[str, np.ndarray]:
    """mAP, mAP@0.5 and mAP@0.75 (size range "all") for each row of ``weights`` (B, N): how
    many times each of the N images is drawn. Float arrays (B,), NaN for a draw without any
    true box."""
    weights = np.asarray(weights, dtype=np.float64)
    if weights.ndim != 2 or weights.shape[1] != len(stats):
        raise InvalidInput(f"weights must be (resamples, {len(stats)}), got {weights.shape}")
    return _summary(_ap_table(_pools(stats, 0), weights))


def map_from_stats(stats: Sequence[ImageStats]) -> dict[str, float | None]:
    """COCO mAP, mAP@0.5, mAP@0.75 and mAP by size of the images in ``stats`` (None where no
    true box counts), equal to COCOeval's on the same images."""
    if not stats:
        raise InvalidInput("no images to score")
    ones = np.ones((1, len(stats)))
    out = {k: json_number(v[0]) for k, v in _summary(_ap_table(_pools(stats, 0), ones)).items()}
    for a, name in enumerate(AREAS[1:], start=1):
        out[f"map_{name}"] = json_number(_summary(_ap_table(_pools(stats, a), ones))["map"][0])
    return out


def _pooled_hits(stats: Sequence[ImageStats], label: int | None = None) -> tuple[np.ndarray, ...]:
    """Scores and hit flags at the first IoU threshold (size range "all"), every class's
    detections together (``label`` None) or one class's, in COCO's order; and the number of
    true boxes they compete for."""
    labels = np.concatenate([s.labels for s in stats])
    scores = np.concatenate([s.scores for s in stats])
    hits = np.concatenate([s.matched[0, 0] for s in stats])
    t_labels = np.concatenate([s.truth_labels for s in stats])
    if label is not None:
        keep = labels == label
        labels, scores, hits = labels[keep], scores[keep], hits[keep]
        t_labels = t_labels[t_labels == label]
    order = np.argsort(-scores, kind="mergesort")
    return scores[order], hits[order], len(t_labels)


def _curve(scores: np.ndarray, hits: np.ndarray, n_truth: int) -> dict[str, list] | None:
    """A precision-recall curve on COCO's 101-point recall grid: the interpolated precision
    (the best precision at this recall or beyond; 0 where the recall is never reached, so
    its mean is the AP) and the score of the box that first reaches that recall (None when
    never reached): read a threshold off the curve for a wanted recall."""
    if n_truth == 0:
        return None
    grid = coco_thresholds()[1]
    tps = np.cumsum(hits)
    fps = np.cumsum(~hits)
    recall = tps / n_truth
    precision = tps / (tps + fps + np.spacing(1))
    envelope = np.maximum.accumulate(precision[::-1])[::-1] if len(precision) else precision
    at = np.searchsorted(recall, grid, side="left")
    reached = at < len(recall)
    safe = np.minimum(at, max(len(recall) - 1, 0))
    return {
        "recall": [round(float(r), 2) for r in grid],
        "precision": [
            round(float(envelope[i]), 4) if ok else 0.0 for i, ok in zip(safe, reached, strict=True)
        ],
        "score": [
            round(float(scores[i]), 4) if ok else None for i, ok in zip(safe, reached, strict=True)
        ],
    }


def threshold_metrics(stats: Sequence[ImageStats], threshold: float) -> dict[str, Any]:
    """Precision, recall and F1 of the boxes scored >= ``threshold`` (every class together) at
    the stats' first IoU threshold (0.5 for COCO's): what a user of the deployed model sees.
    Greedy matching by score makes this the same as matching only the kept boxes."""
    scores, hits, n_truth = _pooled_hits(stats)
    kept = scores >= threshold
    tp, n_kept = int(hits[kept].sum()), int(kept.sum())
    precision = tp / n_kept if n_kept else 0.0
    recall = tp / n_truth if n_truth else 0.0
    f1 = 2 * tp / (n_kept + n_truth) if n_kept + n_truth else 0.0
    return {
        "threshold": float(threshold),
        "iou": round(float(stats[0].iou_thresholds[0]), 4) if stats else 0.5,
        "precision": round(precision, DECIMALS),
        "recall": round(recall, DECIMALS),
        "f1": round(f1, DECIMALS),
        "true_positives": tp,
        "false_positives": n_kept - tp,
        "false_negatives": int(n_truth) - tp,
    }


def _best_f1(scores: np.ndarray, hits: np.ndarray, n_truth: int) -> dict[str, Any]:
    """The cut of a score-sorted list that maximises F1; the threshold is halfway to the next
    lower score (so new boxes scored between the two fall on the kept side by luck only half
    the time, not always), or the lowest score when every box is kept. Ties: the higher
    threshold, fewer boxes."""
    if len(scores) == 0 or n_truth == 0:
        return {"threshold": None, "precision": 0.0, "recall": 0.0, "f1": 0.0}
    tps = np.cumsum(hits)
    kept = np.arange(1, len(scores) + 1)
    last = np.r_[scores[1:] != scores[:-1], True]  # a threshold keeps whole groups of equals
    f1 = np.where(last, 2 * tps / (kept + n_truth), -1.0)
    i = int(np.argmax(f1))
    threshold = float(scores[i]) if i + 1 == len(scores) else float(scores[i] + scores[i + 1]) / 2
    return {
        "threshold": threshold,
        "precision": round(float(tps[i] / kept[i]), DECIMALS),
        "recall": round(float(tps[i] / n_truth), DECIMALS),
        "f1": round(float(f1[i]), DECIMALS),
    }


def choose_threshold(
    preds: Sequence[dict[str, Any]], truths: Sequence[dict[str, Any]], *, iou: float = 0.5
) -> dict[str, Any]:
    """The score threshold that maximises F1 at IoU ``iou`` (every class together), with its
    precision, recall and F1. Pick it on validation data, never on the hold-out it is then
    judged on. ``threshold`` is None when there are no boxes to choose from."""
    if not 0.0 < iou <= 1.0:
        raise InvalidInput(f"iou must be in (0, 1], got {iou}")
    p, t = validated_detections(preds, truths, None)
    stats = [image_stats(a, b, iou_thresholds=[iou]) for a, b in zip(p, t, strict=True)]
    scores, hits, n_truth = _pooled_hits(stats)
    return {
        **_best_f1(scores, hits, n_truth),
        "iou": iou,
        "n_truth": n_truth,
        "n_predictions": len(scores),
    }


def size_counts(truths: Sequence[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """True boxes per COCO size bucket (small < 32², large > 96²), and the number of images
    with at least one: how much evidence stands behind mAP_small/medium/large."""
    out = {b: {"boxes": 0, "images": 0} for b in AREAS[1:]}
    for t in truths:
        area = _areas(np.asarray(t["boxes"], dtype=np.float32).reshape(-1, 4))
        bucket = np.where(area < SMALL_AREA, 0, np.where(area > LARGE_AREA, 2, 1))
        for k, name in enumerate(AREAS[1:]):
            n = int((bucket == k).sum())
            out[name]["boxes"] += n
            out[name]["images"] += int(n > 0)
    return out


def _torchmetrics_map(
    preds: list[dict[str, np.ndarray]], truths: list[dict[str, np.ndarray]]
) -> dict[str, Any]:
    """torchmetrics' COCO mAP (faster_coco_eval backend), with per-class AP and the extended
    summary (the precision array gives AP@0.5 per class)."""
    import torch
    from torchmetrics.detection import MeanAveragePrecision

    metric = MeanAveragePrecision(
        box_format="xyxy",
        iou_type="bbox",
        backend="faster_coco_eval",
        class_metrics=True,
        extended_summary=True,
    )
    metric.warn_on_many_detections = False  # the cap of 100 per image is COCO's, on purpose
    metric.update(
        [
            {
                "boxes": torch.from_numpy(p["boxes"]),
                "scores": torch.from_numpy(p["scores"].astype(np.float32)),
                "labels": torch.from_numpy(p["labels"]),
            }
            for p in preds
        ],
        [
            {"boxes": torch.from_numpy(t["boxes"]), "labels": torch.from_numpy(t["labels"])}
            for t in truths
        ],
    )
    return metric.compute()


def evaluate_detections(
    preds: Sequence[dict[str, Any]],
    truths: Sequence[dict[str, Any]],
    classes: Sequence[str],
    *,
    score_threshold: float | None = None,
) -> dict[str, Any]:
    """The hold-out report of a detector: COCO mAP (0.50:0.95), mAP@0.5, mAP@0.75, mAP and mAR
    by size, mAR@1/10/100, per class AP, AP@0.5 and true/predicted box counts, the true boxes
    per size bucket, precision-recall curves at IoU 0.5 (every class together: the operating
    points of one threshold; and per class), and precision/recall/F1 at ``score_threshold``
    (None when not given). ``best_f1`` is the best F1 any threshold reaches on these images:
    optimistic, since the threshold is tuned on the data it is scored on. JSON-safe: floats,
    ints, lists, None where a metric is undefined (no true boxes of that kind)."""
    if not classes:
        raise InvalidInput("no classes")
    if score_threshold is not None and not 0.0 <= score_threshold <= 1.0:
        raise InvalidInput(f"score_threshold must be in [0, 1], got {score_threshold}")
    p, t = validated_detections(preds, truths, len(classes))
    res = _torchmetrics_map(p, t)
    report: dict[str, Any] = {key: json_number(res[key]) for key in MAP_KEYS}
    present = [int(c) for c in res["classes"].reshape(-1).tolist()]
    ap = res["map_per_class"].reshape(-1).tolist()
    ar = res["mar_100_per_class"].reshape(-1).tolist()
    precision = res.get("precision")
    stats = [image_stats(a, b) for a, b in zip(p, t, strict=True)]
    t_labels = np.concatenate([x["labels"] for x in t])
    p_labels = np.concatenate([x["labels"] for x in p])
    per_class = {}
    for i, name in enumerate(classes):
        k = present.index(i) if i in present else None
        ap50 = None
        if k is not None and precision is not None and precision.ndim == 5:
            curve = precision[0, :, k, 0, -1]
            ap50 = json_number(curve.mean()) if bool((curve > -1).all()) else None
        per_class[name] = {
            "ap": json_number(ap[k]) if k is not None and k < len(ap) else None,
            "ap_50": ap50,
            "ar_100": json_number(ar[k]) if k is not None and k < len(ar) else None,
            "support": int((t_labels == i).sum()),
            "predicted": int((p_labels == i).sum()),
        }
    report.update(
        {
            "n_images": len(t),
            "n_truth": len(t_labels),
            "n_predictions": len(p_labels),
            "sizes": size_counts(t),
            "per_class": per_class,
            "pr_curve": _curve(*_pooled_hits(stats)),
            "pr_curves": {name: _curve(*_pooled_hits(stats, i)) for i, name in enumerate(classes)},
            "at_threshold": (
                threshold_metrics(stats, score_threshold) if score_threshold is not None else None
            ),
            "best_f1": _best_f1(*_pooled_hits(stats)[:2], len(t_labels)),
        }
    )
    return report

"""Paired comparison of two detectors on the same hold-out images: the evidence a promotion of a
detection model is approved on.

mAP is not a mean over images, so there is no McNemar or t-test for it; the honest
uncertainty is a paired bootstrap over images: draw the hold-out's images with replacement,
score both models on the same draw, and read the spread of mAP(B) - mAP(A). Both models see
identical draws, so what the images have in common (easy or hard ones) cancels out and the
interval is much tighter than two separate ones. ``metrics.resampled_map`` makes a thousand
draws take a second or two instead of a thousand COCOeval runs.

Beside the numbers, the images where the two versions' shipped (thresholded) boxes disagree
most, for a person to look at before promoting.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from quarkflow_core.detection.boxes import agreement_arrays, to_dicts
from quarkflow_core.detection.metrics import (
    DECIMALS,
    MAP_KEYS,
    ImageStats,
    evaluate_detections,
    image_stats,
    json_number,
    resampled_map,
    threshold_metrics,
    validated_detections,
)
from quarkflow_core.errors import InvalidInput

REPORT_FORMAT = 1  # bump when the report gains keys a policy reads (cached reports expire)
DEFAULT_THRESHOLD = 0.5  # only when neither a threshold nor any true box lets us pick one
TOP_DISAGREEMENTS = 12


def bootstrap_weights(n: int, *, n_boot: int, seed: int) -> np.ndarray:
    """(n_boot, n) float: how often each of n images is drawn in each resample (a draw of n
    image indices with replacement, seeded)."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_boot, n)) + (np.arange(n_boot) * n)[:, None]
    return np.bincount(idx.ravel(), minlength=n_boot * n).reshape(n_boot, n).astype(np.float64)


def _diff_summary(
    point: float | None, diffs: np.ndarray, confidence: float
) -> dict[str, float | None]:
    """Point difference, percentile CI and the share of resamples with diff <= 0 (how often
    B fails to beat A when the hold-out is redrawn: small means the gain is not luck)."""
    ok = diffs[~np.isnan(diffs)]
    if point is None or len(ok) == 0:
        return {"diff": None, "ci_low": None, "ci_high": None, "p_not_better": None}
    lo, hi = np.quantile(ok, [(1 - confidence) / 2, 1 - (1 - confidence) / 2])
    return {
        "diff": round(point, DECIMALS),
        "ci_low": round(float(lo), DECIMALS),
        "ci_high": round(float(hi), DECIMALS),
        "p_not_better": round(float(np.mean(ok <= 0)), DECIMALS),
    }


def _minus(b: float | None, a: float | None) -> float | None:
    return None if a is None or b is None else round(b - a, DECIMALS)


def _threshold(given: float | None, report: dict[str, Any]) -> dict[str, Any]:
    """The score threshold a model's boxes are shown at: the one it ships with when given,
    else the best-F1 one on this hold-out (said so, since it flatters the model)."""
    if given is not None:
        if not 0.0 <= given <= 1.0:
            raise InvalidInput(f"score threshold must be in [0, 1], got {given}")
        return {"value": float(given), "source": "given"}
    best = report["best_f1"]["threshold"]
    if best is not None:
        return {"value": best, "source": "best_f1_on_holdout"}
    return {"value": DEFAULT_THRESHOLD, "source": "default"}


def _image_map(stats: ImageStats) -> float | None:
    """COCO mAP of one image alone (None when it has no true box)."""
    return json_number(resampled_map([stats], np.ones((1, 1)))["map"][0])


def _disagreement(
    preds_a: list[dict[str, np.ndarray]],
    preds_b: list[dict[str, np.ndarray]],
    truths: list[dict[str, np.ndarray]],
    stats: tuple[list[ImageStats], list[ImageStats]],
    classes: Sequence[str],
    thresholds: tuple[float, float],
    top: int,
) -> dict[str, Any]:
    """Per image, 1 - agreement of the two models' boxes at their thresholds; the ``top``
    images that disagree most (ties: lower index first) with both box lists, the truth and
    each model's AP on that image."""
    kept = []
    for p, thr in ((preds_a, thresholds[0]), (preds_b, thresholds[1])):
        kept.append([(x["boxes"][x["scores"] >= thr], x["labels"][x["scores"] >= thr]) for x in p])
    score = np.array(
        [1.0 - agreement_arrays(*ka, *kb) for ka, kb in zip(kept[0], kept[1], strict=True)]
    )
    order = np.argsort(-score, kind="stable")
    rows = []
    for i in order[:top]:
        if score[i] <= 0:
            break
        shown = []
        for p, thr in ((preds_a[i], thresholds[0]), (preds_b[i], thresholds[1])):
            keep = p["scores"] >= thr
            shown.append(to_dicts(p["boxes"][keep], p["labels"][keep], classes, p["scores"][keep]))
        rows.append(
            {
                "image": int(i),
                "disagreement": round(float(score[i]), DECIMALS),
                "boxes_a": shown[0],
                "boxes_b": shown[1],
                "truth": to_dicts(truths[i]["boxes"], truths[i]["labels"], classes),
                "ap_a": _image_map(stats[0][i]),
                "ap_b": _image_map(stats[1][i]),
            }
        )
    return {
        "mean_agreement": round(float(1.0 - score.mean()), DECIMALS),
        "n_disagreeing": int((score > 0).sum()),
        "images": rows,
    }


def compare_detectors(
    preds_a: Sequence[dict[str, Any]],
    preds_b: Sequence[dict[str, Any]],
    truths: Sequence[dict[str, Any]],
    classes: Sequence[str],
    *,
    n_boot: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
    score_threshold_a: float | None = None,
    score_threshold_b: float | None = None,
    top: int = TOP_DISAGREEMENTS,
) -> dict[str, Any]:
    """Compare detector A (e.g. the champion) with B (the candidate) on the same images, in the
    same order: both hold-out reports side by side, mAP(B) - mAP(A) and mAP@0.5(B) -
    mAP@0.5(A) with paired bootstrap CIs over images, and the images where the two disagree
    most. ``score_threshold_*``: the thresholds the models ship with (their
    ``at_threshold`` metrics and the boxes compared); without one, the best-F1 threshold on
    these images is used and the report says so."""
    if not len(preds_a) == len(preds_b) == len(truths):
        raise InvalidInput(
            f"both models must be scored on the same images: {len(preds_a)} and "
            f"{len(preds_b)} predictions for {len(truths)} images"
        )
    if n_boot < 100:
        raise InvalidInput(f"n_boot must be >= 100 for a usable interval, got {n_boot}")
    if not 0.5 <= confidence < 1.0:
        raise InvalidInput(f"confidence must be in [0.5, 1), got {confidence}")
    rep_a = evaluate_detections(preds_a, truths, classes, score_threshold=score_threshold_a)
    rep_b = evaluate_detections(preds_b, truths, classes, score_threshold=score_threshold_b)
    pa, t = validated_detections(preds_a, truths, len(classes))
    pb, _ = validated_detections(preds_b, truths, len(classes))
    stats_a = [image_stats(x, y) for x, y in zip(pa, t, strict=True)]
    stats_b = [image_stats(x, y) for x, y in zip(pb, t, strict=True)]
    weights = bootstrap_weights(len(t), n_boot=n_boot, seed=seed)
    boot_a, boot_b = resampled_map(stats_a, weights), resampled_map(stats_b, weights)
    thr_a, thr_b = _threshold(score_threshold_a, rep_a), _threshold(score_threshold_b, rep_b)
    main = _diff_summary(
        _minus(rep_b["map"], rep_a["map"]), boot_b["map"] - boot_a["map"], confidence
    )
    at_50 = _diff_summary(
        _minus(rep_b["map_50"], rep_a["map_50"]), boot_b["map_50"] - boot_a["map_50"], confidence
    )
    return {
        "report_format": REPORT_FORMAT,
        "n_images": len(t),
        "n_boot": n_boot,
        "seed": seed,
        "confidence": confidence,
        "map_a": rep_a["map"],
        "map_b": rep_b["map"],
        **main,
        "map_50_a": rep_a["map_50"],
        "map_50_b": rep_b["map_50"],
        **{f"map_50_{k}": v for k, v in at_50.items()},
        "metrics": {
            key: {"a": rep_a[key], "b": rep_b[key], "diff": _minus(rep_b[key], rep_a[key])}
            for key in MAP_KEYS
        },
        "per_class": {
            c: {
                "ap_a": rep_a["per_class"][c]["ap"],
                "ap_b": rep_b["per_class"][c]["ap"],
                "ap_diff": _minus(rep_b["per_class"][c]["ap"], rep_a["per_class"][c]["ap"]),
                "ap_50_a": rep_a["per_class"][c]["ap_50"],
                "ap_50_b": rep_b["per_class"][c]["ap_50"],
                "ap_50_diff": _minus(
                    rep_b["per_class"][c]["ap_50"], rep_a["per_class"][c]["ap_50"]
                ),
                "support": rep_a["per_class"][c]["support"],
            }
            for c in classes
        },
        "sizes": rep_a["sizes"],
        "thresholds": {"a": thr_a, "b": thr_b},
        "at_threshold_a": threshold_metrics(stats_a, thr_a["value"]),
        "at_threshold_b": threshold_metrics(stats_b, thr_b["value"]),
        "disagreement": _disagreement(
            pa, pb, t, (stats_a, stats_b), classes, (thr_a["value"], thr_b["value"]), top
        ),
        "report_a": rep_a,
        "report_b": rep_b,
    }

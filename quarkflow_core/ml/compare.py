"""Paired comparison of two models on the same hold-out: the evidence an ML lead approves on.

Besides the point estimates it says what the hold-out can and cannot show: per class, the
paired discordant images (A right and B wrong, or the reverse) with a one-sided exact binomial
test and a Newcombe CI for the recall difference, and overall the power of the paired McNemar
test (the smallest accuracy difference it detects with 80% power at this size).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from scipy.stats import binomtest, norm

from quarkflow_core.errors import InvalidInput
from quarkflow_core.ml.evaluate import classification_report

BETTER, SAME, WORSE = "better", "not significantly different", "worse"
REPORT_FORMAT = 3  # bump when the report gains keys the policy reads (cached reports expire)
POWER = 0.8  # the power at which the minimum detectable accuracy difference is stated


def mcnemar_exact(a_correct: np.ndarray, b_correct: np.ndarray) -> dict[str, float]:
    """Exact (binomial) McNemar test on the discordant pairs."""
    only_a = int(np.sum(a_correct & ~b_correct))  # A right, B wrong
    only_b = int(np.sum(~a_correct & b_correct))  # A wrong, B right
    n = only_a + only_b
    p = 1.0 if n == 0 else float(binomtest(min(only_a, only_b), n, 0.5).pvalue)
    return {"only_a_correct": only_a, "only_b_correct": only_b, "p_value": min(p, 1.0)}


def bootstrap_diff_ci(
    a_correct: np.ndarray,
    b_correct: np.ndarray,
    *,
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float]:
    """Paired bootstrap CI of accuracy(B) - accuracy(A)."""
    rng = np.random.default_rng(seed)
    n = len(a_correct)
    diff = b_correct.astype(float) - a_correct.astype(float)
    idx = rng.integers(0, n, size=(n_boot, n))
    means = diff[idx].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def min_discordant(alpha: float, *, two_sided: bool) -> int:
    """The fewest discordant pairs, all in one direction, whose exact binomial test reaches
    p < alpha (6 two-sided, 5 one-sided at 0.05). Fewer can never be significant, so a class
    with fewer images than this can never fail on evidence."""
    if not 0.0 < alpha < 1.0:
        raise InvalidInput(f"alpha must be in (0, 1), got {alpha}")
    sides = 2 if two_sided else 1
    k = 1
    while sides * 0.5**k >= alpha:
        k += 1
    return k


def wilson_interval(k: int, n: int, z: float) -> tuple[float, float]:
    """Wilson score interval of a proportion k / n."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def paired_diff_ci(
    both: int, only_a: int, only_b: int, neither: int, *, level: float = 0.95
) -> tuple[float, float]:
    """CI of p_B - p_A for paired right/wrong outcomes: Newcombe's hybrid score interval
    (Newcombe 1998, method 10): Wilson intervals of both proportions, combined with a
    correction for their correlation. Unlike a bootstrap or Wald interval it stays sound for a
    class of ten images."""
    n = both + only_a + only_b + neither
    if n == 0:
        return -1.0, 1.0
    z = float(norm.ppf(1 - (1 - level) / 2))
    right_a, right_b = both + only_a, both + only_b
    p_a, p_b = right_a / n, right_b / n
    lo_a, hi_a = wilson_interval(right_a, n, z)
    lo_b, hi_b = wilson_interval(right_b, n, z)
    margins = right_a * (n - right_a) * right_b * (n - right_b)
    phi = 0.0 if margins == 0 else (both * neither - only_a * only_b) / math.sqrt(margins)
    theta = p_b - p_a

    def spread(x: float, y: float) -> float:
        return math.sqrt(max(0.0, x * x - 2 * phi * x * y + y * y))

    lo = theta - spread(p_b - lo_b, hi_a - p_a)
    hi = theta + spread(hi_b - p_b, p_a - lo_a)
    return max(-1.0, lo), min(1.0, hi)


def class_tests(
    y: np.ndarray, a_ok: np.ndarray, b_ok: np.ndarray, classes: list[str], *, alpha: float
) -> dict[str, dict[str, Any]]:
    """Per class: the paired discordant images (``lost``: A right, B wrong; ``gained``: the
    reverse), the one-sided exact binomial p-value that B's recall is lower, and the Newcombe
    CI of the recall difference B - A."""
    k_one = min_discordant(alpha, two_sided=False)
    out = {}
    for i, c in enumerate(classes):
        m = y == i
        n_c = int(m.sum())
        a, b = a_ok[m], b_ok[m]
        lost, gained = int(np.sum(a & ~b)), int(np.sum(~a & b))
        both, neither = int(np.sum(a & b)), int(np.sum(~a & ~b))
        p = (
            float(binomtest(lost, lost + gained, 0.5, alternative="greater").pvalue)
            if lost + gained
            else 1.0
        )
        out[c] = {
            "n": n_c,
            "lost": lost,
            "gained": gained,
            "p_worse": min(p, 1.0),
            "recall_delta_ci": (
                list(paired_diff_ci(both, lost, gained, neither, level=1 - alpha)) if n_c else None
            ),
            "min_detectable_drop": k_one / n_c if n_c else None,
        }
    return out


def power_summary(
    n: int, discordant: int, class_n: dict[str, int], *, alpha: float, power: float = POWER
) -> dict[str, Any]:
    """What this hold-out can detect.

    Accuracy: the minimum detectable difference of the paired McNemar test at ``power``,
    ``(z[1-alpha/2] + z[power]) * sqrt(psi / n)``, with psi the observed discordance rate
    floored at ``k_min / n``, and never below ``k_min / n`` (``k_min``: the fewest one-way
    discordant pairs that can be significant). A class: the smallest recall drop that can be
    significant at all, ``k_min_one_sided / n_class``, for the class with the fewest images."""
    k_two = min_discordant(alpha, two_sided=True)
    k_one = min_discordant(alpha, two_sided=False)
    floor = k_two / n if n else math.inf
    rate = discordant / n if n else 0.0
    z = float(norm.ppf(1 - alpha / 2) + norm.ppf(power))
    mdd = max(z * math.sqrt(max(rate, floor) / n), floor) if n else math.inf
    smallest = min(class_n, key=lambda c: class_n[c]) if class_n else None
    n_min = class_n[smallest] if smallest is not None else 0
    return {
        "n": n,
        "alpha": alpha,
        "power": power,
        "discordant": discordant,
        "discordance_rate": rate,
        "min_discordant_two_sided": k_two,
        "mdd_accuracy": mdd if math.isfinite(mdd) else None,
        "per_class_n": dict(class_n),
        "min_class": smallest,
        "min_class_n": n_min,
        "min_discordant_one_sided": k_one,
        "min_detectable_class_drop": k_one / n_min if n_min else None,
    }


def _pts(x: float) -> str:
    return f"{x * 100:.1f} points"


def power_statement(power: dict[str, Any]) -> str:
    """The power summary in plain words (the policy's ``power`` check and the UIs say this)."""
    n, alpha = power["n"], power["alpha"]
    where = f" of snapshot #{power['snapshot_id']}" if power.get("snapshot_id") else ""
    n_min, smallest = power["min_class_n"], power["min_class"]
    even = len(set(power["per_class_n"].values())) <= 1
    per = f"{n_min:,} per class" if even else f"min {n_min:,} per class, in class {smallest}"
    head = f"hold-out{where}: {n:,} images ({per})"
    mdd = power["mdd_accuracy"]
    if mdd is None or mdd > 1:
        acc = (
            f"too few images to detect any accuracy difference (a paired test needs at least "
            f"{power['min_discordant_two_sided']} images on which the two disagree)"
        )
    else:
        acc = (
            f"detects accuracy differences ≥ {_pts(mdd)} ({power['power']:.0%} power, paired "
            f"McNemar, α = {alpha:g})"
        )
    drop, k_one = power["min_detectable_class_drop"], power["min_discordant_one_sided"]
    if drop is None:
        cls = f"class {smallest} has no hold-out images, so its recall cannot be judged"
    elif drop > 1:
        cls = (
            f"no class recall drop can be significant with only {n_min} images of class "
            f"{smallest} (a one-sided exact test needs {k_one} lost images)"
        )
    else:
        cls = (
            f"class recall drops ≥ {_pts(drop)} (the smallest a one-sided exact test can call "
            f"significant with {n_min} images of a class)"
        )
    return f"{head}; {acc} and {cls}"


def ece_delta_ci(
    conf_a: np.ndarray,
    ok_a: np.ndarray,
    conf_b: np.ndarray,
    ok_b: np.ndarray,
    *,
    n_bins: int = 15,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float]:
    """Paired bootstrap CI of ECE(B) - ECE(A) (equal-width confidence bins, L1), resampling
    images: how much of a calibration change is noise of the hold-out."""
    rng = np.random.default_rng(seed)
    n = len(conf_a)
    idx = rng.integers(0, n, size=(n_boot, n))
    rows = np.repeat(np.arange(n_boot), n)

    def ece(conf: np.ndarray, ok: np.ndarray) -> np.ndarray:
        bins = np.clip(np.ceil(conf * n_bins).astype(int) - 1, 0, n_bins - 1)
        acc = np.zeros((n_boot, n_bins))
        np.add.at(acc, (rows, bins[idx].ravel()), (conf - ok)[idx].ravel())
        return np.abs(acc).sum(1) / n

    diff = ece(conf_b, ok_b.astype(float)) - ece(conf_a, ok_a.astype(float))
    lo, hi = np.quantile(diff, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def compare(
    labels: torch.Tensor,
    probs_a: torch.Tensor,
    probs_b: torch.Tensor,
    classes: list[str],
    *,
    meta_a: dict[str, Any] | None = None,
    meta_b: dict[str, Any] | None = None,
    alpha: float = 0.05,
    n_boot: int = 2000,
    seed: int = 0,
) -> dict[str, Any]:
    """Compare A (e.g. the champion) with B (the candidate) on identical, aligned items.

    ``meta_*`` may carry ``size_bytes`` and ``latency_ms`` for the size/latency deltas."""
    if not (probs_a.shape == probs_b.shape and probs_a.shape[0] == labels.shape[0]):
        raise InvalidInput("both models must be scored on the same items, in the same order")
    rep_a = classification_report(probs_a, labels, classes)
    rep_b = classification_report(probs_b, labels, classes)
    y = labels.numpy()
    a_ok = probs_a.argmax(1).numpy() == y
    b_ok = probs_b.argmax(1).numpy() == y
    test = mcnemar_exact(a_ok, b_ok)
    lo, hi = bootstrap_diff_ci(a_ok, b_ok, n_boot=n_boot, seed=seed)
    diff = rep_b["accuracy"] - rep_a["accuracy"]
    if test["p_value"] < alpha and diff > 0:
        verdict = BETTER
    elif test["p_value"] < alpha and diff < 0:
        verdict = WORSE
    else:
        verdict = SAME
    tests = class_tests(y, a_ok, b_ok, classes, alpha=alpha)
    per_class = {
        c: {
            "recall_a": rep_a["per_class"][c]["recall"],
            "recall_b": rep_b["per_class"][c]["recall"],
            "recall_delta": rep_b["per_class"][c]["recall"] - rep_a["per_class"][c]["recall"],
            "f1_delta": rep_b["per_class"][c]["f1"] - rep_a["per_class"][c]["f1"],
            **tests[c],
        }
        for c in classes
    }
    power = power_summary(
        len(y),
        test["only_a_correct"] + test["only_b_correct"],
        {c: t["n"] for c, t in tests.items()},
        alpha=alpha,
    )
    meta_a, meta_b = meta_a or {}, meta_b or {}
    deltas = {
        key: meta_b[key] - meta_a[key]
        for key in ("size_bytes", "latency_ms", "params")
        if key in meta_a and key in meta_b
    }
    disagree = np.nonzero(probs_a.argmax(1).numpy() != probs_b.argmax(1).numpy())[0]
    return {
        "report_format": REPORT_FORMAT,
        "n": len(y),
        "alpha": alpha,
        "accuracy_a": rep_a["accuracy"],
        "accuracy_b": rep_b["accuracy"],
        "accuracy_delta": diff,
        "accuracy_delta_ci95": [lo, hi],
        "macro_f1_delta": rep_b["macro_f1"] - rep_a["macro_f1"],
        "mcnemar": test,
        "ece_a": rep_a["ece"],
        "ece_b": rep_b["ece"],
        "ece_delta": rep_b["ece"] - rep_a["ece"],
        "ece_delta_ci95": list(
            ece_delta_ci(
                probs_a.max(1).values.numpy(), a_ok, probs_b.max(1).values.numpy(), b_ok, seed=seed
            )
        ),
        "per_class": per_class,
        "confusion_a": rep_a["confusion_matrix"],
        "confusion_b": rep_b["confusion_matrix"],
        "reliability_a": rep_a["reliability"],
        "reliability_b": rep_b["reliability"],
        "deltas": deltas,
        "disagreements": disagree.tolist(),
        "verdict": verdict,
        "power": power,
    }

"""Paired comparison of two models on the same hold-out: the evidence an ML lead approves on."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from scipy.stats import binomtest

from quarkflow_core.errors import InvalidInput
from quarkflow_core.ml.evaluate import classification_report

BETTER, SAME, WORSE = "better", "not significantly different", "worse"


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
    per_class = {
        c: {
            "recall_a": rep_a["per_class"][c]["recall"],
            "recall_b": rep_b["per_class"][c]["recall"],
            "recall_delta": rep_b["per_class"][c]["recall"] - rep_a["per_class"][c]["recall"],
            "f1_delta": rep_b["per_class"][c]["f1"] - rep_a["per_class"][c]["f1"],
        }
        for c in classes
    }
    meta_a, meta_b = meta_a or {}, meta_b or {}
    deltas = {
        key: meta_b[key] - meta_a[key]
        for key in ("size_bytes", "latency_ms", "params")
        if key in meta_a and key in meta_b
    }
    disagree = np.nonzero(probs_a.argmax(1).numpy() != probs_b.argmax(1).numpy())[0]
    return {
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
        "per_class": per_class,
        "confusion_a": rep_a["confusion_matrix"],
        "confusion_b": rep_b["confusion_matrix"],
        "reliability_a": rep_a["reliability"],
        "reliability_b": rep_b["reliability"],
        "deltas": deltas,
        "disagreements": disagree.tolist(),
        "verdict": verdict,
    }

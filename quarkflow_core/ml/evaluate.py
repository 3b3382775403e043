"""Evaluation: hold-out metrics (torchmetrics), calibration error, latency, stratified k-fold."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from torch import nn
from torchmetrics.functional.classification import (
    multiclass_accuracy,
    multiclass_calibration_error,
    multiclass_confusion_matrix,
    multiclass_f1_score,
    multiclass_precision,
    multiclass_recall,
)

from quarkflow_core.errors import InvalidInput
from quarkflow_core.ml.data import ImageSet
from quarkflow_core.ml.engine import predict_logits, time_calls
from quarkflow_core.ml.transforms import Preprocess

ECE_BINS = 15


def reliability_bins(
    probs: torch.Tensor, labels: torch.Tensor, n_bins: int = ECE_BINS
) -> list[dict]:
    """Per confidence bin: mean confidence, accuracy and count (the reliability diagram)."""
    conf, pred = probs.max(dim=1)
    correct = (pred == labels).float()
    edges = torch.linspace(0, 1, n_bins + 1)
    out = []
    for i in range(n_bins):
        lo, hi = float(edges[i]), float(edges[i + 1])
        mask = (conf > lo) & (conf <= hi) if i else (conf >= lo) & (conf <= hi)
        n = int(mask.sum())
        out.append(
            {
                "lo": lo,
                "hi": hi,
                "count": n,
                "confidence": float(conf[mask].mean()) if n else None,
                "accuracy": float(correct[mask].mean()) if n else None,
            }
        )
    return out


def classification_report(
    probs: torch.Tensor, labels: torch.Tensor, classes: list[str], *, topk: tuple[int, ...] = (1, 3)
) -> dict[str, Any]:
    """Accuracy, macro-F1, per-class P/R/F1, confusion matrix, top-k, ECE (15 bins), NLL."""
    if probs.shape[0] != labels.shape[0] or probs.shape[0] == 0:
        raise InvalidInput("need the same, non-zero number of predictions and labels")
    nc = len(classes)
    preds = probs.argmax(1)
    per_p = multiclass_precision(preds, labels, nc, average=None, zero_division=0)
    per_r = multiclass_recall(preds, labels, nc, average=None, zero_division=0)
    per_f = multiclass_f1_score(preds, labels, nc, average=None, zero_division=0)
    support = torch.bincount(labels, minlength=nc)
    report: dict[str, Any] = {
        "n": int(labels.shape[0]),
        "accuracy": float(multiclass_accuracy(preds, labels, nc, average="micro")),
        "macro_f1": float(multiclass_f1_score(preds, labels, nc, average="macro")),
        "ece": float(multiclass_calibration_error(probs, labels, nc, n_bins=ECE_BINS, norm="l1")),
        "nll": float(nn.functional.nll_loss(torch.log(probs.clamp_min(1e-12)), labels)),
        "per_class": {
            c: {
                "precision": float(per_p[i]),
                "recall": float(per_r[i]),
                "f1": float(per_f[i]),
                "support": int(support[i]),
            }
            for i, c in enumerate(classes)
        },
        "confusion_matrix": multiclass_confusion_matrix(preds, labels, nc).tolist(),
        "reliability": reliability_bins(probs, labels),
    }
    for k in topk:
        if k <= nc:
            report[f"top{k}_accuracy"] = float(
                multiclass_accuracy(probs, labels, nc, average="micro", top_k=k)
            )
    return report


def predict_proba(
    model: nn.Module,
    images: torch.Tensor,
    preset: Preprocess,
    *,
    temperature: float = 1.0,
    batch_size: int = 256,
) -> torch.Tensor:
    logits = predict_logits(model, images, preset, batch_size=batch_size)
    return torch.softmax(logits / temperature, dim=1)


def measure_latency(
    model: nn.Module, preset: Preprocess, *, batch_size: int = 1, repeats: int = 30, warmup: int = 5
) -> dict[str, float]:
    """CPU/GPU latency of one forward pass at ``batch_size`` (median and p95, ms)."""
    device = next(model.parameters()).device
    x = torch.zeros(batch_size, preset.channels, preset.size, preset.size, device=device)
    model.eval()

    def forward(batch: torch.Tensor) -> None:
        model(batch)
        if device.type == "cuda":
            torch.cuda.synchronize()

    with torch.inference_mode():
        times = sorted(time_calls(forward, x, repeats=repeats, warmup=warmup))
    median = statistics.median(times)
    return {
        "batch_size": batch_size,
        "median_ms": median,
        "p95_ms": times[min(len(times) - 1, int(0.95 * len(times)))],
        "per_image_ms": median / batch_size,
    }


def evaluate_model(
    model: nn.Module,
    data: ImageSet,
    preset: Preprocess,
    *,
    temperature: float = 1.0,
    latency: bool = True,
) -> dict[str, Any]:
    """Hold-out report for ``model`` (calibrated with ``temperature``) on ``data``, with the
    ECE before calibration beside the calibrated one (one inference pass for both)."""
    logits = predict_logits(model, data.images, preset)
    report = classification_report(
        torch.softmax(logits / temperature, 1), data.labels, data.classes
    )
    report["temperature"] = temperature
    report["ece_uncalibrated"] = float(
        multiclass_calibration_error(
            torch.softmax(logits, 1), data.labels, len(data.classes), n_bins=ECE_BINS, norm="l1"
        )
    )
    if latency:
        report["latency"] = {
            "batch1": measure_latency(model, preset, batch_size=1),
            "batch32": measure_latency(model, preset, batch_size=32, repeats=10),
        }
    return report


def stratified_kfold(
    labels: torch.Tensor, *, k: int = 5, seed: int = 0
) -> list[tuple[np.ndarray, np.ndarray]]:
    """k (train_index, test_index) pairs: stratified, disjoint test folds covering everything."""
    from sklearn.model_selection import StratifiedKFold

    if k < 2:
        raise InvalidInput(f"k must be >= 2, got {k}")
    min_class = int(torch.bincount(labels).min())
    if min_class < k:
        raise InvalidInput(f"a class has only {min_class} examples; k={k} folds need at least k")
    skf = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    return list(skf.split(np.zeros(len(labels)), labels.numpy()))


def cross_validate(
    data: ImageSet,
    config: Any,
    *,
    k: int = 5,
    progress: Callable[[int, int, dict], None] | None = None,
) -> dict[str, Any]:
    """Train k models (``fit`` with ``config``) on k-1 folds, test on the held fold.

    Returns per-fold metrics and mean ± std for accuracy, macro-F1 and ECE."""
    from quarkflow_core.ml.calibration import fit_temperature
    from quarkflow_core.ml.train import fit

    folds = []
    for i, (train_idx, test_idx) in enumerate(stratified_kfold(data.labels, k=k, seed=config.seed)):
        res = fit(data.subset(train_idx), replace(config, seed=config.seed + i))
        t = fit_temperature(predict_logits(res.model, res.val.images, res.preset), res.val.labels)
        test = data.subset(test_idx)
        rep = classification_report(
            predict_proba(res.model, test.images, res.preset, temperature=t),
            test.labels,
            data.classes,
        )
        fold = {
            "fold": i + 1,
            "accuracy": rep["accuracy"],
            "macro_f1": rep["macro_f1"],
            "ece": rep["ece"],
            "n_test": len(test),
            "epochs": len(res.history),
        }
        folds.append(fold)
        if progress is not None:
            progress(i + 1, k, fold)
    summary: dict[str, Any] = {"k": k, "folds": folds}
    for metric in ("accuracy", "macro_f1", "ece"):
        values = [f[metric] for f in folds]
        summary[metric] = {"mean": statistics.fmean(values), "std": statistics.pstdev(values)}
    return summary

"""Derived forms of a trained artifact: a pruned artifact (new folder, its own manifest and a
link to its parent) and exports written inside an unregistered artifact."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

from quarkflow_core.errors import InvalidInput
from quarkflow_core.ml.artifacts import LoadedModel, add_files, manifest_sha256, save_artifact
from quarkflow_core.ml.calibration import fit_temperature
from quarkflow_core.ml.data import ImageSet, stratified_split
from quarkflow_core.ml.engine import predict_logits
from quarkflow_core.ml.evaluate import classification_report


def prune_artifact(
    loaded: LoadedModel,
    *,
    train: ImageSet,
    holdout: ImageSet,
    ratio: float,
    method: str = "structured",
    recover_epochs: int = 2,
    out_dir: str | Path,
    seed: int = 0,
) -> tuple[dict[str, Any], str]:
    """Prune, recover (structured), re-calibrate, measure before/after, save. Returns
    (report, manifest sha256 of the new artifact)."""
    from quarkflow_core.ml.prune import (
        measure,
        prune_structured,
        prune_unstructured,
        recover,
        structured_report,
        unstructured_report,
        weight_sparsity,
    )

    if method not in ("structured", "unstructured"):
        raise InvalidInput(f"unknown pruning method {method!r}; valid: structured, unstructured")
    preset = loaded.preset
    keep, held = stratified_split(train.labels, fraction=0.1, seed=seed)
    fit_part, val = train.subset(keep), train.subset(held)
    before = measure(loaded.model, preset, images_uint8=holdout.images, labels=holdout.labels)
    if method == "structured":
        example = preset.normalize(holdout.images[:1])
        model = prune_structured(loaded.model, example, ratio=ratio)
        recover(model, fit_part, preset, epochs=recover_epochs, seed=seed)
        model.cpu().eval()
        after = measure(model, preset, images_uint8=holdout.images, labels=holdout.labels)
        report = structured_report(ratio, before, after)
    else:
        model = prune_unstructured(copy.deepcopy(loaded.model), amount=ratio).eval()
        after = measure(model, preset, images_uint8=holdout.images, labels=holdout.labels)
        report = unstructured_report(ratio, before, after, weight_sparsity(model))
    temperature = fit_temperature(predict_logits(model, val.images, preset), val.labels)
    holdout_report = classification_report(
        torch.softmax(predict_logits(model, holdout.images, preset) / temperature, 1),
        holdout.labels,
        holdout.classes,
    )
    summary = report.to_dict()
    sha = save_artifact(
        out_dir,
        model=model,
        architecture=loaded.architecture,
        classes=loaded.classes,
        in_channels=loaded.manifest["in_channels"],
        preset=preset,
        temperature=temperature,
        metrics={"holdout": holdout_report, "pruning": summary},
        training=loaded.manifest.get("training", {}),
        dataset=loaded.manifest.get("dataset", {}),
        extra={
            "parent": {"manifest_sha256": manifest_sha256(loaded.path), "path": str(loaded.path)}
        },
    )
    flat = {
        "accuracy_before": report.before.get("accuracy"),
        "accuracy_after": report.after.get("accuracy"),
        "params_before": report.before["params"],
        "params_after": report.after["params"],
        "macs_before": report.before["macs"],
        "macs_after": report.after["macs"],
        "bytes_before": report.before["bytes"],
        "bytes_after": report.after["bytes"],
        **{k: v for k, v in report.ratios().items() if k.startswith("speedup_")},
    }
    if report.sparsity is not None:
        flat["sparsity"] = report.sparsity
    return flat, sha


def export_artifact(loaded: LoadedModel, *, fmt: str, images: torch.Tensor) -> float:
    """Export into the artifact folder and record the files in its manifest.

    Returns the parity check's max |Δprobability| (the export raises when it exceeds 1e-4)."""
    from quarkflow_core.ml.export import check_parity, export_onnx, export_torchscript

    example = loaded.preset.normalize(images[:1])
    if fmt == "onnx":
        paths = export_onnx(
            loaded.model,
            example,
            loaded.path / "model.onnx",
            images_uint8=images,
            preset=loaded.preset,
        )
        target: Any = paths[0]
    elif fmt == "torchscript":
        paths = [
            export_torchscript(
                loaded.model,
                example,
                loaded.path / "model.ts",
                images_uint8=images,
                preset=loaded.preset,
            )
        ]
        target = paths[0]
    else:
        raise InvalidInput(f"unknown export format {fmt!r}; valid: onnx, torchscript, all")
    diff = check_parity(loaded.model, target, images, loaded.preset)
    exports = dict(loaded.manifest.get("exports", {}))
    exports[fmt] = {"files": [p.name for p in paths], "parity_max_abs_diff": diff}
    add_files(loaded.path, [p.name for p in paths], exports=exports)
    loaded.manifest["exports"] = exports
    return diff

"""Derived forms of a trained artifact: a pruned or an INT8 (quantized) artifact (new folder,
its own manifest and a link to its parent) and exports written inside an unregistered
artifact."""

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


def quantize_artifact(
    loaded: LoadedModel,
    *,
    train: ImageSet,
    holdout: ImageSet,
    out_dir: str | Path,
    max_loss_points: float = 0.5,
    calibration_images: int = 256,
    threads: int = 2,
    per_channel: bool = True,
    seed: int = 0,
) -> tuple[dict[str, Any], str]:
    """INT8 variant: ONNX Runtime static quantization (QDQ, per-channel weights) calibrated on
    a stratified sample of ``train``, measured against fp32 on ``holdout`` with ONNX Runtime,
    refused (InvalidInput naming the figures) when it loses more than ``max_loss_points`` of
    accuracy, re-calibrated (temperature, review threshold) on a validation split with its own
    logits, and saved like a pruned variant: same classes/preset, the fp32 weights for
    provenance, ``model.onnx`` = the INT8 graph, ``metrics.holdout`` = the INT8 model's report,
    ``metrics.quantization`` = the evidence, ``parent`` and ``serving.requires``. Returns
    (evidence, manifest sha256 of the new artifact)."""
    import shutil
    import tempfile

    from quarkflow_core.ml.calibration import threshold_for_accuracy
    from quarkflow_core.ml.quantize import (
        ONNX_RUNTIME,
        calibration_sample,
        check_loss,
        onnx_files,
        ort_logits,
        quantization_evidence,
        quantize_onnx,
        requires_onnxruntime,
        session,
    )

    if loaded.manifest.get("task") == "detection":
        raise InvalidInput("INT8 quantization is not offered for detectors (classifiers only)")
    if requires_onnxruntime(loaded.manifest):
        raise InvalidInput(f"{loaded.path} is an INT8 variant already; quantize its parent")
    if list(holdout.classes) != list(loaded.classes):
        raise InvalidInput("the hold-out's classes are not the model's")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise InvalidInput(f"artifact folder {out} is not empty; artifacts are immutable")
    preset = loaded.preset
    keep, held = stratified_split(train.labels, fraction=0.1, seed=seed)
    fit_part, val = train.subset(keep), train.subset(held)
    with tempfile.TemporaryDirectory(prefix="qf-int8-") as tmp:
        work = Path(tmp)
        fp32 = onnx_files(loaded.path) if "onnx" in loaded.manifest.get("exports", {}) else []
        if not fp32:  # no fp32 export yet: make one here, parity-checked like any export
            from quarkflow_core.ml.export import export_onnx

            fp32 = export_onnx(
                loaded.model,
                preset.normalize(holdout.images[:1]),
                work / "fp32" / "model.onnx",
                images_uint8=holdout.images[:64],
                preset=preset,
            )
        int8_path = work / "model.onnx"
        recipe = quantize_onnx(
            fp32[0],
            int8_path,
            calibration=calibration_sample(fit_part, n=calibration_images, seed=seed),
            preset=preset,
            per_channel=per_channel,
            work_dir=work / "pre",
        )
        evidence, int8_logits, latency = quantization_evidence(
            fp32_files=fp32,
            int8_path=int8_path,
            holdout=holdout,
            preset=preset,
            temperature=loaded.temperature,
            threads=threads,
        )
        evidence.update(recipe, max_loss_points=max_loss_points)
        check_loss(evidence, max_loss_points)
        val_logits = ort_logits(session(int8_path, threads=threads), val.images, preset)
        temperature = fit_temperature(val_logits, val.labels)
        threshold = threshold_for_accuracy(torch.softmax(val_logits / temperature, 1), val.labels)
        holdout_report = classification_report(
            torch.softmax(int8_logits / temperature, 1), holdout.labels, holdout.classes
        )
        holdout_report.update(temperature=temperature, latency=latency)
        save_artifact(
            out,
            model=loaded.model,  # the fp32 weights, for provenance; model.onnx serves
            architecture=loaded.architecture,
            classes=loaded.classes,
            in_channels=loaded.manifest["in_channels"],
            preset=preset,
            temperature=temperature,
            metrics={
                "holdout": holdout_report,
                "temperature": temperature,
                "review_threshold": threshold,
                "quantization": evidence,
            },
            training=loaded.manifest.get("training", {}),
            dataset=loaded.manifest.get("dataset", {}),
            extra={
                "parent": {
                    "manifest_sha256": manifest_sha256(loaded.path),
                    "path": str(loaded.path),
                },
                "serving": {"requires": ONNX_RUNTIME, "precision": "int8"},
            },
        )
        shutil.copyfile(int8_path, out / "model.onnx")
    exports = {
        "onnx": {
            "files": ["model.onnx"],
            "precision": "int8",
            # against the fp32 graph on the hold-out (an export's eager parity does not apply)
            "parity_max_abs_diff": evidence["max_abs_prob_diff"],
        }
    }
    sha = add_files(out, ["model.onnx"], exports=exports)
    return evidence, sha


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

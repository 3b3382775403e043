"""ONNX export of a detector, checked for parity with the eager model on real images, and the
onnxruntime runner the ``DetectionPredictor`` serves it with.

The exported graph is the whole detector: uint8 (H, W, 3) RGB in, of any size; resize,
normalisation, the network, box decoding, NMS and the rescale to the input's pixels inside;
``boxes`` (k, 4) float32, ``scores`` (k,) float32, ``labels`` (k,) int64 out (torchvision's
labels: 0 is background, so class index = label - 1). One image per call, because torchvision's
detectors take a list of differently sized images and ONNX has no lists.

The TorchScript-based exporter (``dynamo=False``) is used on purpose: the torch.export-based
one fails on SSD's and Faster R-CNN's data-dependent control flow. An export that changes
predictions is worse than none, so ``export_detector_onnx`` raises ``ExportParityError``.
"""

from __future__ import annotations

import copy
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from quarkflow_core.detection.artifacts import LoadedDetector
from quarkflow_core.errors import InvalidInput, QuarkflowError
from quarkflow_core.ml.artifacts import add_files
from quarkflow_core.ml.export import ExportParityError

ONNX_FILE = "model.onnx"
ONNX_OPSET = 17
INPUT = "image"
OUTPUTS = ("boxes", "scores", "labels")
# Parity: every eager box scoring at least PARITY_FLOOR must have an ONNX twin with the same
# label, |Δscore| <= score_atol and every corner within box_atol px (and the other way round).
# Boxes just under the floor may cross it on one side only, so the twin is searched among
# boxes down to half the floor.
PARITY_FLOOR = 0.05
SCORE_ATOL = 1e-3
BOX_ATOL_PX = 0.5


class _PreResized(GeneralizedRCNNTransform):
    """The detector's own transform minus the resize, which ``_ImageDetector`` does first."""

    def resize(self, image: torch.Tensor, target: Any = None) -> tuple[torch.Tensor, Any]:
        return image, target


class _ImageDetector(nn.Module):
    """One uint8 (H, W, 3) image in, (boxes, scores, labels) out: the graph that is exported,
    so a caller of the ONNX file needs no preprocessing code.

    It resizes the image itself, with the output size computed in float64 as eager PyTorch
    does (Python floats): torchvision's traced resize computes it in float32, where e.g.
    200 * (320 / 200) floors to 319, and the padded image then gives other boxes (found with
    onnxruntime 1.31 on 100, 200 and 400 px squares and on 199 x 257).
    The boxes are scaled back exactly as torchvision's ``resize_boxes`` does (float32)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        transform = model.transform
        self.min_size = float(transform.min_size[-1])
        self.max_size = float(transform.max_size)
        self.fixed_size = transform.fixed_size
        self.model = copy.deepcopy(model).eval()
        self.model.transform.__class__ = _PreResized

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        from torch.onnx import operators

        hw = operators.shape_as_tensor(image)[:2]
        if self.fixed_size is not None:
            out = torch.tensor([self.fixed_size[1], self.fixed_size[0]], dtype=torch.int64)
        else:
            side = hw.to(torch.float64)
            # 1-d float64 tensors on both sides of the division: with a Python float or a
            # 0-d tensor the exporter inserts a Cast to float32 before the Div, which brings
            # the off-by-one floor back (257 * (320 / 257) -> 319)
            limits = torch.tensor([self.min_size, self.max_size], dtype=torch.float64)
            scale = (limits / torch.stack([side.min(), side.max()])).min()
            out = torch.floor(side * scale).to(torch.int64)
        x = image.permute(2, 0, 1).float() / 255.0
        x = nn.functional.interpolate(
            x[None], size=(out[0], out[1]), mode="bilinear", align_corners=False
        )[0]
        found = self.model([x])[0]
        ratio = hw.to(torch.float32) / out.to(torch.float32)  # (h, w): original / resized
        boxes = found["boxes"] * torch.stack([ratio[1], ratio[0], ratio[1], ratio[0]])
        return boxes, found["scores"], found["labels"]


class OnnxDetector:
    """An onnxruntime session over an exported detector (CPUExecutionProvider, all graph
    optimizations). ``run`` returns the same dicts as ``train.detect``."""

    name = "onnxruntime"

    def __init__(self, path: str | Path, *, threads: int | None = None) -> None:
        import onnxruntime as ort

        path = Path(path)
        if not path.is_file():
            raise InvalidInput(f"ONNX file not found: {path}")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads is not None:
            options.intra_op_num_threads = threads
        self.path = path
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def run(self, image: np.ndarray, *, score_floor: float = 0.05) -> dict[str, np.ndarray]:
        """Detections on one uint8 (H, W, 3) image, in its pixels, scores descending."""
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise InvalidInput(f"need a uint8 (H, W, 3) RGB image, got {image.dtype} {image.shape}")
        boxes, scores, labels = self.session.run(
            list(OUTPUTS), {INPUT: np.ascontiguousarray(image)}
        )
        keep = np.nonzero(scores >= score_floor)[0]
        keep = keep[np.argsort(-scores[keep], kind="stable")]
        return {
            "boxes": boxes[keep].astype(np.float32).reshape(-1, 4),
            "scores": scores[keep].astype(np.float32),
            "labels": labels[keep].astype(np.int64) - 1,
        }

    def detect(
        self, images: Sequence[np.ndarray], *, score_floor: float = 0.05
    ) -> list[dict[str, np.ndarray]]:
        return [self.run(img, score_floor=score_floor) for img in images]


def _onnx_path(loaded: LoadedDetector, out: str | Path) -> Path:
    path = Path(out)
    if path.suffix != ".onnx":
        path = path / ONNX_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        raise InvalidInput(f"{path} exists already; exports are immutable")
    return path


def _export(model: nn.Module, example: np.ndarray, path: Path) -> None:
    wrapper = _ImageDetector(model).eval()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # the tracer warns about every Python-side shape computation torchvision makes
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.simplefilter("ignore", UserWarning)
            # the legacy exporter is chosen on purpose (see the module docstring)
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", FutureWarning)
            torch.onnx.export(
                wrapper,
                (torch.from_numpy(np.ascontiguousarray(example)),),
                str(path),
                dynamo=False,
                opset_version=ONNX_OPSET,
                input_names=[INPUT],
                output_names=list(OUTPUTS),
                dynamic_axes={
                    INPUT: {0: "height", 1: "width"},
                    **{name: {0: "detections"} for name in OUTPUTS},
                },
            )
    except Exception as exc:  # the exporter raises many unrelated types; keep the cause
        path.unlink(missing_ok=True)
        raise QuarkflowError(f"ONNX export failed: {exc}", code="export_failed") from exc


def _box_diffs(
    want: dict[str, np.ndarray],
    got: dict[str, np.ndarray],
    floor: float,
) -> tuple[float, float, int]:
    """(max |Δscore|, max |Δcorner| px, unmatched count) of ``want``'s boxes at or over
    ``floor`` against their closest same-label twin in ``got`` (down to floor / 2)."""
    worst_score, worst_box, unmatched = 0.0, 0.0, 0
    pool = got["scores"] >= floor / 2
    g_boxes, g_scores, g_labels = got["boxes"][pool], got["scores"][pool], got["labels"][pool]
    for box, score, label in zip(want["boxes"], want["scores"], want["labels"], strict=True):
        if score < floor:
            continue
        same = np.nonzero(g_labels == label)[0]
        if len(same) == 0:
            unmatched += 1
            continue
        corner = np.abs(g_boxes[same] - box).max(axis=1)
        j = int(np.argmin(corner + np.abs(g_scores[same] - score) * 1e3))
        worst_box = max(worst_box, float(corner[j]))
        worst_score = max(worst_score, float(abs(g_scores[same][j] - score)))
    return worst_score, worst_box, unmatched


def check_detector_parity(
    model: nn.Module,
    onnx: OnnxDetector,
    images: Sequence[np.ndarray],
    *,
    score_atol: float = SCORE_ATOL,
    box_atol: float = BOX_ATOL_PX,
    floor: float = PARITY_FLOOR,
) -> dict[str, Any]:
    """Compare eager and ONNX detections on ``images`` both ways; raise ExportParityError on
    a box missing on one side or a difference over the tolerances."""
    from quarkflow_core.detection.train import detect

    if not images:
        raise InvalidInput("parity needs at least one real image")
    eager = detect(model, list(images), device="cpu", score_floor=floor / 2)
    exported = onnx.detect(images, score_floor=floor / 2)
    worst_score, worst_box, unmatched, compared = 0.0, 0.0, 0, 0
    for e, o in zip(eager, exported, strict=True):
        compared += int((e["scores"] >= floor).sum())
        for want, got in ((e, o), (o, e)):
            s, b, u = _box_diffs(want, got, floor)
            worst_score, worst_box, unmatched = (
                max(worst_score, s),
                max(worst_box, b),
                unmatched + u,
            )
    report = {
        "parity_max_abs_diff": worst_score,
        "parity_max_box_diff_px": worst_box,
        "parity_unmatched": unmatched,
        "parity_boxes_compared": compared,
        "parity_images": len(images),
        "parity_floor": floor,
    }
    if unmatched or worst_score > score_atol or worst_box > box_atol:
        raise ExportParityError(
            f"ONNX export disagrees with eager on {len(images)} images: {unmatched} boxes "
            f"without a twin, max |Δscore| {worst_score:.3g} (atol {score_atol:g}), max "
            f"|Δcorner| {worst_box:.3g} px (atol {box_atol:g})",
            max_abs_diff=max(worst_score, float(unmatched)),
        )
    return report


def export_detector_onnx(
    loaded: LoadedDetector,
    out_dir_or_path: str | Path,
    *,
    sample_images: Sequence[np.ndarray],
    score_atol: float = SCORE_ATOL,
    box_atol: float = BOX_ATOL_PX,
) -> dict[str, Any]:
    """Export ``loaded`` to ONNX (``model.onnx`` in a folder, or the ``.onnx`` path given),
    check parity on ``sample_images`` (real uint8 RGB images, any sizes), and when the file is
    inside the artifact folder record it in the manifest's ``exports["onnx"]``. Returns the
    parity report (``parity_max_abs_diff``: the largest score difference) plus the path and
    the ONNX file's sha256 and size."""
    from quarkflow_core.ml.artifacts import sha256_file

    images = [np.asarray(img) for img in sample_images]
    if not images:
        raise InvalidInput("sample_images: the parity check needs at least one real image")
    path = _onnx_path(loaded, out_dir_or_path)
    model = loaded.model.cpu().eval()
    started = time.perf_counter()
    _export(model, images[0], path)
    try:
        import onnx

        onnx.checker.check_model(str(path))
        report = check_detector_parity(
            model, OnnxDetector(path), images, score_atol=score_atol, box_atol=box_atol
        )
    except BaseException:
        path.unlink(missing_ok=True)  # never leave an unchecked export behind
        raise
    report.update(
        {
            "files": [path.name],
            "opset": ONNX_OPSET,
            "input": f"{INPUT}: uint8 (H, W, 3) RGB",
            "outputs": list(OUTPUTS),
            "label_offset": 1,
            "export_seconds": round(time.perf_counter() - started, 2),
        }
    )
    if path.parent.resolve() == Path(loaded.path).resolve():
        exports = dict(loaded.manifest.get("exports", {}))
        exports["onnx"] = dict(report)
        add_files(loaded.path, [path.name], exports=exports)
        loaded.manifest["exports"] = exports
    report["path"] = str(path)
    report["sha256"] = sha256_file(path)
    report["size_bytes"] = path.stat().st_size
    return report

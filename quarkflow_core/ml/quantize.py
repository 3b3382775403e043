"""INT8 static quantization with ONNX Runtime: an fp32 ONNX graph -> a QDQ graph whose weights
(per channel) and activations are 8-bit, calibrated on training images preprocessed exactly as
serving preprocesses them (the artifact's preset, then ``normalize``).

The evidence every INT8 variant carries (``quantization_evidence``) is measured with ONNX
Runtime on the hold-out, fp32 and INT8 side by side with the same thread count: accuracy and
the loss in points, top-1 agreement, max |Δ probability|, file sizes, batch-1 latency and
batch-32 throughput. ``quantize_artifact`` (``ml/variants.py``) refuses a variant that loses
more than ``max_loss_points`` of accuracy.

An INT8 artifact says ``"serving": {"requires": "onnxruntime"}``: its ``weights.pt`` is the fp32
parent's, kept for provenance; what serves (and what the registry compares) is ``model.onnx``."""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from quarkflow_core.errors import InvalidInput, QuarkflowError
from quarkflow_core.ml.data import ImageSet
from quarkflow_core.ml.transforms import Preprocess

ONNX_RUNTIME = "onnxruntime"
QUANT_FORMAT = "QDQ"
DEFAULT_MAX_LOSS_POINTS = 0.5
DEFAULT_CALIBRATION_IMAGES = 256
DEFAULT_THREADS = 2


def requires_onnxruntime(manifest: dict[str, Any] | None) -> bool:
    """True for an artifact that only ONNX Runtime serves (an INT8 variant)."""
    return ((manifest or {}).get("serving") or {}).get("requires") == ONNX_RUNTIME


def onnx_files(folder: str | Path) -> list[Path]:
    """``model.onnx`` and, when present, its external-data file."""
    folder = Path(folder)
    return [p for p in (folder / "model.onnx", folder / "model.onnx.data") if p.is_file()]


def files_bytes(paths: list[Path]) -> int:
    return sum(p.stat().st_size for p in paths)


# --------------------------------------------------------------------------- calibration


def calibration_sample(train: ImageSet, *, n: int, seed: int = 0) -> ImageSet:
    """About ``n`` training images, the same share of every class (seeded)."""
    from quarkflow_core.ml.data import stratified_split

    if len(train) == 0:
        raise InvalidInput("quantization needs training images to calibrate on")
    if n >= len(train):
        return train
    _, picked = stratified_split(train.labels, fraction=n / len(train), seed=seed)
    return train.subset(picked) if len(picked) else train.subset(np.arange(min(n, len(train))))


class ImageCalibrationReader:
    """An ``onnxruntime.quantization.CalibrationDataReader`` over uint8 images: each batch is
    normalized with the artifact's preset, as serving does."""

    def __init__(
        self, images_uint8: torch.Tensor, preset: Preprocess, *, input_name: str, batch: int = 32
    ):
        self.images, self.preset, self.input_name, self.batch = (
            images_uint8,
            preset,
            input_name,
            batch,
        )
        self._it: Iterator[dict[str, np.ndarray]] | None = None

    def _batches(self) -> Iterator[dict[str, np.ndarray]]:
        for start in range(0, self.images.shape[0], self.batch):
            x = self.preset.normalize(self.images[start : start + self.batch])
            yield {self.input_name: np.ascontiguousarray(x.numpy(), dtype=np.float32)}

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._it is None:
            self._it = self._batches()
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = None


def quantize_onnx(
    fp32_path: str | Path,
    out_path: str | Path,
    *,
    calibration: ImageSet,
    preset: Preprocess,
    per_channel: bool = True,
    work_dir: str | Path,
) -> dict[str, Any]:
    """``quant_pre_process`` (shape inference + graph optimisation), then ``quantize_static``
    in QDQ format: INT8 weights (per channel when ``per_channel``), UINT8 activations, MinMax
    calibration. Writes one self-contained file; returns the recipe."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    fp32_path, out_path, work = Path(fp32_path), Path(out_path), Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    # one self-contained fp32 graph (the weights inlined): the tools below then need no
    # external-data handling, and a small classifier fits well under protobuf's 2 GB
    inlined = work / "fp32-inlined.onnx"
    onnx.save_model(onnx.load(str(fp32_path)), str(inlined))
    source, preprocessed = inlined, work / "fp32-pre.onnx"
    try:
        quant_pre_process(str(inlined), str(preprocessed))
        source, pre = preprocessed, True
    except Exception:  # optional step: quantize the exported graph as it is
        pre = False
    input_name = onnx.load(str(source), load_external_data=False).graph.input[0].name
    reader = ImageCalibrationReader(calibration.images, preset, input_name=input_name)
    try:
        quantize_static(
            str(source),
            str(out_path),
            reader,
            quant_format=QuantFormat.QDQ,
            per_channel=per_channel,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
        )
    except Exception as exc:  # the quantizer raises many unrelated types; keep the cause
        raise QuarkflowError(f"INT8 quantization failed: {exc}", code="quantize_failed") from exc
    onnx.checker.check_model(str(out_path))
    return {
        "method": "onnxruntime static quantization",
        "quant_format": QUANT_FORMAT,
        "per_channel": per_channel,
        "weight_type": "int8",
        "activation_type": "uint8",
        "calibrate_method": "MinMax",
        "calibration_images": len(calibration),
        "pre_processed": pre,
    }


# --------------------------------------------------------------------------- measurement


def session(path: str | Path, *, threads: int = DEFAULT_THREADS) -> Any:
    """A CPU InferenceSession with every graph optimisation and ``threads`` intra-op threads."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def ort_logits(
    sess: Any, images_uint8: torch.Tensor, preset: Preprocess, *, batch_size: int = 64
) -> torch.Tensor:
    """Logits (N, classes) of an ONNX Runtime session for uint8 images."""
    name = sess.get_inputs()[0].name
    outs = []
    for start in range(0, images_uint8.shape[0], batch_size):
        x = preset.normalize(images_uint8[start : start + batch_size]).numpy()
        outs.append(torch.from_numpy(sess.run(None, {name: np.ascontiguousarray(x)})[0]))
    return torch.cat(outs) if outs else torch.empty(0)


def paired_latency(
    sessions: dict[str, Any],
    images_uint8: torch.Tensor,
    preset: Preprocess,
    *,
    batch_size: int,
    repeats: int,
    warmup: int = 3,
) -> dict[str, dict[str, float]]:
    """Per session: median and p95 wall time (ms) of one ``run`` at ``batch_size`` on real
    images, and images per second at the median. The sessions take turns call by call, so a
    busy neighbour on a shared CPU slows them alike."""
    from quarkflow_core.ml.prune import batch_of

    x = np.ascontiguousarray(preset.normalize(batch_of(images_uint8, batch_size)).numpy())
    feeds = {name: {sess.get_inputs()[0].name: x} for name, sess in sessions.items()}
    for name, sess in sessions.items():
        for _ in range(warmup):
            sess.run(None, feeds[name])
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(repeats):
        for name, sess in sessions.items():
            start = time.perf_counter()
            sess.run(None, feeds[name])
            times[name].append((time.perf_counter() - start) * 1000.0)
    out = {}
    for name, ts in times.items():
        ts.sort()
        median = statistics.median(ts)
        out[name] = {
            "batch_size": batch_size,
            "median_ms": median,
            "p95_ms": ts[min(len(ts) - 1, int(0.95 * len(ts)))],
            "per_image_ms": median / batch_size,
            "images_per_s": 1000.0 * batch_size / median,
        }
    return out


def _softmax(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return torch.softmax(logits.float() / temperature, 1)


def quantization_evidence(
    *,
    fp32_files: list[Path],
    int8_path: Path,
    holdout: ImageSet,
    preset: Preprocess,
    temperature: float,
    threads: int = DEFAULT_THREADS,
    repeats_b1: int = 100,
    repeats_b32: int = 20,
) -> tuple[dict[str, Any], torch.Tensor, dict[str, Any]]:
    """fp32 against INT8, both under ONNX Runtime with ``threads`` threads, on the hold-out.
    Returns (evidence, INT8 hold-out logits, INT8 latency in the hold-out report's shape)."""
    if len(holdout) == 0:
        raise InvalidInput("quantization evidence needs hold-out images")
    fp32_sess, int8_sess = (
        session(fp32_files[0], threads=threads),
        session(int8_path, threads=threads),
    )
    fp32_logits = ort_logits(fp32_sess, holdout.images, preset)
    int8_logits = ort_logits(int8_sess, holdout.images, preset)
    labels = holdout.labels
    pred32, pred8 = fp32_logits.argmax(1), int8_logits.argmax(1)
    acc32 = float((pred32 == labels).float().mean())
    acc8 = float((pred8 == labels).float().mean())
    dprob = float(
        (_softmax(fp32_logits, temperature) - _softmax(int8_logits, temperature)).abs().max()
    )
    sessions = {"fp32": fp32_sess, "int8": int8_sess}
    b1 = paired_latency(sessions, holdout.images, preset, batch_size=1, repeats=repeats_b1)
    b32 = paired_latency(sessions, holdout.images, preset, batch_size=32, repeats=repeats_b32)
    lat = {name: {"batch1": b1[name], "batch32": b32[name]} for name in sessions}
    bytes32, bytes8 = files_bytes(fp32_files), int8_path.stat().st_size
    import onnxruntime as ort

    evidence = {
        "holdout_n": len(holdout),
        "accuracy_fp32": acc32,
        "accuracy_int8": acc8,
        "accuracy_loss_points": 100.0 * (acc32 - acc8),
        "agreement": float((pred32 == pred8).float().mean()),
        "max_abs_prob_diff": dprob,
        "bytes_fp32": bytes32,
        "bytes_int8": bytes8,
        "size_ratio": bytes8 / bytes32,
        "threads": threads,
        "latency_ms_b1_fp32": lat["fp32"]["batch1"]["median_ms"],
        "latency_ms_b1_int8": lat["int8"]["batch1"]["median_ms"],
        "speedup_b1": lat["fp32"]["batch1"]["median_ms"] / lat["int8"]["batch1"]["median_ms"],
        "images_per_s_b32_fp32": lat["fp32"]["batch32"]["images_per_s"],
        "images_per_s_b32_int8": lat["int8"]["batch32"]["images_per_s"],
        "speedup_b32": lat["int8"]["batch32"]["images_per_s"]
        / lat["fp32"]["batch32"]["images_per_s"],
        "onnxruntime": ort.__version__,
        "backend": ONNX_RUNTIME,
    }
    return evidence, int8_logits, {**lat["int8"], "backend": ONNX_RUNTIME, "threads": threads}


def check_loss(evidence: dict[str, Any], max_loss_points: float) -> None:
    """Refuse a variant whose hold-out accuracy loss exceeds ``max_loss_points``."""
    loss = evidence["accuracy_loss_points"]
    if loss > max_loss_points:
        raise InvalidInput(
            f"INT8 variant refused: it loses {loss:.2f} points of hold-out accuracy "
            f"({evidence['accuracy_fp32']:.2%} fp32 -> {evidence['accuracy_int8']:.2%} INT8 on "
            f"{evidence['holdout_n']} images, top-1 agreement {evidence['agreement']:.2%}, max "
            f"|Δ prob| {evidence['max_abs_prob_diff']:.3f}), more than the {max_loss_points:g} "
            "allowed; nothing was saved"
        )


# --------------------------------------------------------------------------- as served


def served_proba(loaded: Any, images_uint8: torch.Tensor) -> torch.Tensor:
    """Calibrated probabilities of a loaded version as it is served: an INT8 variant's through
    ONNX Runtime (its ``model.onnx``), any other's eager. The registry's comparison scores
    both sides with this, so an INT8 candidate is judged on its own predictions."""
    from quarkflow_core.ml.evaluate import predict_proba

    if not requires_onnxruntime(loaded.manifest):
        return predict_proba(
            loaded.model, images_uint8, loaded.preset, temperature=loaded.temperature
        )
    sess = session(loaded.path / "model.onnx", threads=torch.get_num_threads())
    return _softmax(ort_logits(sess, images_uint8, loaded.preset), loaded.temperature)


def served_latency_ms(loaded: Any, *, onnx: bool = False) -> float:
    """Median batch-1 latency (ms) as served: ONNX Runtime (torch's thread count) for an INT8
    variant, and with ``onnx`` for any version that has a ``model.onnx`` (so an INT8 variant
    and its fp32 parent are timed by the same runtime); else eager."""
    from quarkflow_core.ml.evaluate import measure_latency

    path = loaded.path / "model.onnx"
    if not (requires_onnxruntime(loaded.manifest) or (onnx and path.is_file())):
        return measure_latency(loaded.model, loaded.preset)["median_ms"]
    preset = loaded.preset
    zeros = torch.zeros(1, preset.channels, preset.size, preset.size, dtype=torch.uint8)
    sess = session(path, threads=torch.get_num_threads())
    lat = paired_latency({"onnx": sess}, zeros, preset, batch_size=1, repeats=30, warmup=5)
    return lat["onnx"]["median_ms"]


def evaluate_int8(loaded: Any, holdout: ImageSet, *, threads: int | None = None) -> dict[str, Any]:
    """``evaluate_model``'s report for an INT8 variant, from its INT8 graph (ONNX Runtime)."""
    from quarkflow_core.ml.evaluate import classification_report

    sess = session(loaded.path / "model.onnx", threads=threads or torch.get_num_threads())
    logits = ort_logits(sess, holdout.images, loaded.preset)
    report = classification_report(
        _softmax(logits, loaded.temperature), holdout.labels, holdout.classes
    )
    lat = {}
    for bs, repeats in ((1, 30), (32, 10)):
        timed = paired_latency(
            {"int8": sess}, holdout.images, loaded.preset, batch_size=bs, repeats=repeats
        )
        lat[f"batch{bs}"] = timed["int8"]
    return {
        **report,
        "temperature": loaded.temperature,
        "latency": {**lat, "backend": ONNX_RUNTIME},
    }

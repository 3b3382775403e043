"""Export to TorchScript and ONNX, a parity check on real images that every export must pass,
and inference backends (eager, TorchScript, onnxruntime) behind one ``Backend`` interface.

An export that silently changes predictions is worse than no export, so each export function
compares softmax probabilities against the eager model and raises ``ExportParityError``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn

from quarkflow_core.errors import InvalidInput, QuarkflowError
from quarkflow_core.ml.transforms import Preprocess

ONNX_OPSET = 18
BACKENDS = ("eager", "onnxruntime", "torchscript")


class ExportParityError(QuarkflowError):
    """The exported model disagrees with the eager one on real images."""

    code = "export_parity"

    def __init__(self, detail: str, *, max_abs_diff: float) -> None:
        super().__init__(detail)
        self.max_abs_diff = max_abs_diff


# --------------------------------------------------------------------------- backends


@runtime_checkable
class Backend(Protocol):
    """Normalized float NCHW in, logits (N, classes) as float32 numpy out."""

    name: str

    def logits(self, x_float_nchw: np.ndarray | torch.Tensor) -> np.ndarray: ...


def _as_tensor(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(x, dtype=torch.float32)


class EagerBackend:
    name = "eager"

    def __init__(self, model: nn.Module) -> None:
        self.model = model.eval()
        self.device = next(model.parameters()).device

    def logits(self, x_float_nchw: np.ndarray | torch.Tensor) -> np.ndarray:
        with torch.inference_mode():
            out = self.model(_as_tensor(x_float_nchw).to(self.device))
        return out.float().cpu().numpy()


class TorchScriptBackend:
    name = "torchscript"

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        if not path.is_file():
            raise InvalidInput(f"TorchScript file not found: {path}")
        self.module = torch.jit.load(str(path), map_location="cpu").eval()

    def logits(self, x_float_nchw: np.ndarray | torch.Tensor) -> np.ndarray:
        with torch.inference_mode():
            return self.module(_as_tensor(x_float_nchw)).float().numpy()


class OnnxRuntimeBackend:
    """CPUExecutionProvider with all graph optimizations (BN folding, fusions, NCHWc layout)."""

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
        self._bind(ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]))

    @classmethod
    def from_session(cls, session: Any) -> OnnxRuntimeBackend:
        """Wrap an ``onnxruntime.InferenceSession`` the caller configured itself."""
        backend = cls.__new__(cls)
        backend._bind(session)
        return backend

    def _bind(self, session: Any) -> None:
        self.session = session
        self.input_name = session.get_inputs()[0].name
        self.output_name = session.get_outputs()[0].name

    def logits(self, x_float_nchw: np.ndarray | torch.Tensor) -> np.ndarray:
        x = np.ascontiguousarray(np.asarray(x_float_nchw, dtype=np.float32))
        return self.session.run([self.output_name], {self.input_name: x})[0]


def load_backend(kind: str, source: nn.Module | str | Path, **options: Any) -> Backend:
    """``eager`` takes an nn.Module; ``torchscript`` / ``onnxruntime`` take a file path.
    Options (e.g. ``threads=2``) go to the onnxruntime backend."""
    if kind not in BACKENDS:
        raise InvalidInput(f"unknown backend {kind!r}; valid: {', '.join(BACKENDS)}")
    if kind == "eager":
        if not isinstance(source, nn.Module):
            raise InvalidInput("the eager backend needs an nn.Module")
        return EagerBackend(source)
    if isinstance(source, nn.Module):
        raise InvalidInput(f"the {kind} backend needs a file path, not a module")
    if kind == "torchscript":
        return TorchScriptBackend(source)
    return OnnxRuntimeBackend(source, **options)


# --------------------------------------------------------------------------- parity


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _exported_backend(exported: Any) -> Backend:
    if isinstance(exported, Backend):
        return exported
    if isinstance(exported, str | Path):
        suffix = Path(exported).suffix
        return load_backend("onnxruntime" if suffix == ".onnx" else "torchscript", exported)
    import onnxruntime as ort

    if isinstance(exported, ort.InferenceSession):
        return OnnxRuntimeBackend.from_session(exported)
    raise InvalidInput(f"cannot check parity against {type(exported).__name__}")


class _EvalMode:
    """Export in eval mode (BN running stats, no dropout), then restore the caller's mode."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.was_training = model.training

    def __enter__(self) -> nn.Module:
        return self.model.eval()

    def __exit__(self, *exc: object) -> None:
        self.model.train(self.was_training)


def check_parity(
    reference_model: nn.Module,
    exported: str | Path | Backend | Any,
    images_uint8: torch.Tensor,
    preset: Preprocess,
    *,
    atol: float = 1e-4,
    batch_size: int = 32,
) -> float:
    """Max |softmax(eager) - softmax(exported)| over real images; raises ExportParityError when
    it exceeds ``atol`` (or outputs differ in shape / are not finite)."""
    if images_uint8.shape[0] == 0:
        raise InvalidInput("parity needs at least one real image")
    with _EvalMode(reference_model):
        return _max_prob_diff(reference_model, exported, images_uint8, preset, atol, batch_size)


def _max_prob_diff(
    reference_model: nn.Module,
    exported: Any,
    images_uint8: torch.Tensor,
    preset: Preprocess,
    atol: float,
    batch_size: int,
) -> float:
    reference = EagerBackend(reference_model)
    backend = _exported_backend(exported)
    worst = 0.0
    for start in range(0, images_uint8.shape[0], batch_size):
        x = preset.normalize(images_uint8[start : start + batch_size].cpu())
        want = reference.logits(x)
        got = backend.logits(x)
        if got.shape != want.shape:
            raise ExportParityError(
                f"{backend.name} output shape {got.shape} != eager {want.shape}",
                max_abs_diff=float("inf"),
            )
        diff = float(np.abs(_softmax(want) - _softmax(got)).max())
        if not np.isfinite(diff):
            diff = float("inf")
        worst = max(worst, diff)
    if worst > atol:
        raise ExportParityError(
            f"{backend.name} export disagrees with eager: max |Δ prob| = {worst:.3g} > "
            f"atol {atol:g} on {images_uint8.shape[0]} images",
            max_abs_diff=worst,
        )
    return worst


# --------------------------------------------------------------------------- exporters


def export_torchscript(
    model: nn.Module,
    example_input: torch.Tensor,
    path: str | Path,
    *,
    images_uint8: torch.Tensor,
    preset: Preprocess,
    atol: float = 1e-4,
) -> Path:
    """Trace + freeze (BN folded, constants inlined) + save, then check parity on
    ``images_uint8``. torch.jit is deprecated upstream (FutureWarning) but still the simplest
    Python-free artifact for the libtorch runtime."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _EvalMode(model) as m, torch.no_grad():
        frozen = torch.jit.freeze(torch.jit.trace(m, example_input))
        torch.jit.save(frozen, str(path))
        check_parity(m, path, images_uint8, preset, atol=atol)
    return path


_FLOAT_TYPES = (1, 10, 11, 16)  # onnx.TensorProto FLOAT, FLOAT16, DOUBLE, BFLOAT16


def _inline_index_constants(proto: Any) -> Any:
    """Turn non-float initializers (axes, shapes) into Constant nodes so they stay inside
    ``model.onnx``: with size_threshold=0 they would go to the .data file too, and
    onnxruntime's shape inference cannot read external data ("Cannot parse data from external
    tensors"). Weights (float initializers) all still go to the .data file."""
    from onnx import helper

    graph = proto.graph
    keep, constants = [], []
    for tensor in graph.initializer:
        if tensor.data_type in _FLOAT_TYPES:
            keep.append(tensor)
        else:
            constants.append(
                helper.make_node(
                    "Constant", [], [tensor.name], value=tensor, name=f"const_{tensor.name}"
                )
            )
    if constants:
        del graph.initializer[:]
        graph.initializer.extend(keep)
        nodes = constants + list(graph.node)
        del graph.node[:]
        graph.node.extend(nodes)
    return proto


def export_onnx(
    model: nn.Module,
    example_input: torch.Tensor,
    path: str | Path,
    *,
    images_uint8: torch.Tensor,
    preset: Preprocess,
    dynamic_batch: bool = True,
    atol: float = 1e-4,
    opset: int = ONNX_OPSET,
) -> list[Path]:
    """``model.onnx`` (graph, input ``input``, output ``logits``) + ``model.onnx.data`` (all
    weights), via the torch.export-based exporter; checked with onnx.checker and for parity
    with onnxruntime. Returns both paths."""
    import onnx

    path = Path(path)
    if path.suffix != ".onnx":
        raise InvalidInput(f"ONNX path must end with .onnx, got {path.name}")
    if opset < 17:
        raise InvalidInput(f"opset must be >= 17, got {opset}")
    data_path = path.with_name(path.name + ".data")
    path.parent.mkdir(parents=True, exist_ok=True)
    dynamic_shapes: Sequence[dict] | None = None
    if dynamic_batch:
        dynamic_shapes = ({0: torch.export.Dim("batch", min=1)},)
    with _EvalMode(model) as m:
        try:
            program = torch.onnx.export(
                m,
                (example_input,),
                dynamo=True,
                opset_version=opset,
                verbose=False,
                input_names=["input"],
                output_names=["logits"],
                dynamic_shapes=dynamic_shapes,
            )
        except Exception as exc:  # the exporter raises many unrelated types; keep the cause
            raise QuarkflowError(f"ONNX export failed: {exc}", code="export_failed") from exc
        proto = _inline_index_constants(program.model_proto)
        data_path.unlink(missing_ok=True)  # onnx appends to an existing external-data file
        onnx.save_model(
            proto,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=data_path.name,
            size_threshold=0,
        )
        onnx.checker.check_model(str(path))
        check_parity(m, path, images_uint8, preset, atol=atol)
    return [path, data_path]

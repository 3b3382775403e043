"""Which backend serves a model, on which device: the GPU when one is usable, else ONNX Runtime
on the CPU when the artifact has a checked export, else eager PyTorch on the CPU.

``QF_SERVING_BACKEND``:

- ``auto`` (default): ``cuda`` when CUDA is usable, else ``onnxruntime`` when the artifact has
  an ONNX export, else ``eager``. An artifact that must run on ONNX Runtime (an INT8 variant:
  its manifest says ``"serving": {"requires": "onnxruntime"}``) always does.
- ``cuda``: eager PyTorch on the GPU, fp16 autocast, channels-last, uint8 frames sent to the
  device and normalized there (a quarter of the bytes of a float batch over PCIe). Where CUDA is
  not usable, or the model fails to start on it, serving falls back to the CPU choice and says
  why (``BackendChoice.fallback``, on ``/readyz`` and the workbench's overview).
- ``onnxruntime`` / ``eager``: the CPU, as asked.

Why eager fp16 and not ONNX Runtime's CUDA provider: the CUDA provider ships in the separate
``onnxruntime-gpu`` wheel, which replaces the ``onnxruntime`` CPU wheel every install here
relies on (same module name) and is built against a CUDA other than torch's own; eager fp16
needs nothing beyond the pinned torch. ``bench/bench_gpu.py`` measures both paths the torch
wheel offers (fp32 and fp16 autocast, by batch size) on a GPU when one is lent.

A GPU wants bigger batches than two CPU cores: ``serving_batching`` gives the micro-batcher's
batch size and wait per backend, unless ``QF_SERVING_MAX_BATCH`` / ``QF_SERVING_MAX_WAIT_MS``
were set explicitly."""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from quarkflow_core.errors import InvalidInput, QuarkflowError

log = logging.getLogger("quarkflow.serving")

SERVING_BACKENDS = ("auto", "eager", "onnxruntime", "cuda")
# micro-batch size and longest wait (ms) on a GPU: one forward of 128 224 px images takes a
# few ms there, so a short wait fills a much larger batch than on two CPU cores
GPU_BATCHING = (128, 2.0)


class BackendUnavailable(QuarkflowError):
    """The backend asked for cannot run here (no CUDA, or the model failed to start on it)."""

    code = "backend_unavailable"


def cuda_status() -> tuple[bool, str]:
    """(usable, the device's name or why not)."""
    try:
        if not torch.cuda.is_available():
            built = torch.version.cuda
            return False, (
                "no CUDA device is visible"
                + (f"; this torch is built for CUDA {built}" if built else "; CPU-only torch")
            )
        return True, torch.cuda.get_device_name(0)
    except Exception as exc:  # a broken driver raises from is_available / get_device_name
        return False, f"CUDA check failed: {type(exc).__name__}: {exc}"[:300]


@dataclass(frozen=True)
class BackendChoice:
    """``kind``: eager | onnxruntime | cuda; ``device``: what runs it; ``reason``: why this
    one; ``fallback``: set when the backend asked for (or preferred) could not be used."""

    kind: str
    device: str
    reason: str
    fallback: str | None = None

    def with_fallback(self, why: str) -> BackendChoice:
        return BackendChoice(self.kind, self.device, self.reason, why)


def choose_backend(
    requested: str,
    *,
    has_onnx: bool,
    requires: str | None = None,
    cuda: Callable[[], tuple[bool, str]] = cuda_status,
) -> BackendChoice:
    """The backend for ``requested`` (see the module docstring) given what the artifact has
    (``has_onnx``; ``requires``: the manifest's ``serving.requires``) and what this machine
    has (``cuda``: a probe, ``cuda_status`` by default)."""
    if requested not in SERVING_BACKENDS:
        raise InvalidInput(
            f"unknown serving backend {requested!r}; valid: {', '.join(SERVING_BACKENDS)}"
        )
    if requires == "onnxruntime":
        if not has_onnx:
            raise InvalidInput("this artifact must be served by ONNX Runtime but has no model.onnx")
        choice = BackendChoice("onnxruntime", "cpu", "the artifact runs only on ONNX Runtime")
        if requested in ("eager", "cuda"):
            return choice.with_fallback(
                f"{requested} was asked for, but this artifact (an INT8 variant) runs only on "
                "ONNX Runtime"
            )
        return choice
    cpu = (
        BackendChoice("onnxruntime", "cpu", "the artifact's checked ONNX export, on the CPU")
        if has_onnx and requested != "eager"
        else BackendChoice("eager", "cpu", "eager PyTorch on the CPU")
    )
    if requested == "onnxruntime" and not has_onnx:
        raise InvalidInput(
            "this version has no ONNX export; run `quarkflow export` before registering it, "
            "or serve it with the eager backend"
        )
    if requested in ("eager", "onnxruntime"):
        return BackendChoice(cpu.kind, "cpu", f"{requested} was asked for (QF_SERVING_BACKEND)")
    usable, detail = cuda()
    if usable:
        return BackendChoice("cuda", f"cuda:0 ({detail})", "a CUDA device is usable")
    if requested == "cuda":
        return cpu.with_fallback(f"cuda was asked for, but {detail}")
    return BackendChoice(cpu.kind, "cpu", f"{cpu.reason} ({detail})")


def serving_batching(kind: str, *, max_batch: int, max_wait_ms: float) -> tuple[int, float]:
    """The micro-batcher's (batch size, wait ms) for a backend: the settings' on the CPU; on a
    GPU at least ``GPU_BATCHING``'s."""
    if kind != "cuda":
        return max_batch, max_wait_ms
    return max(max_batch, GPU_BATCHING[0]), max(max_wait_ms, GPU_BATCHING[1])


class TorchDeviceBackend:
    """Eager PyTorch on a device: a private copy of the model there, channels-last, fp16
    autocast on CUDA. ``logits_uint8`` takes the uint8 batch and normalizes it on the device.
    Starting it runs one forward pass, so a device that cannot run the model fails here (and
    serving falls back) rather than on the first request."""

    takes_uint8 = True

    def __init__(
        self,
        model: nn.Module,
        *,
        device: str = "cuda",
        half: bool = True,
        example_shape: tuple[int, ...] | None = None,
    ) -> None:
        self.device = torch.device(device)
        self.name = "cuda" if self.device.type == "cuda" else "eager"
        self.half = half and self.device.type == "cuda"
        try:
            self.model = copy.deepcopy(model).to(self.device).eval()
            self.model = self.model.to(memory_format=torch.channels_last)
            if example_shape is not None:
                self.logits(np.zeros(example_shape, dtype=np.float32))
        except Exception as exc:
            raise BackendUnavailable(
                f"the model did not start on {self.device}: {type(exc).__name__}: {exc}"[:400]
            ) from exc

    def _forward(self, x: torch.Tensor) -> np.ndarray:
        x = x.contiguous(memory_format=torch.channels_last)
        with (
            torch.inference_mode(),
            torch.autocast(self.device.type, dtype=torch.float16, enabled=self.half),
        ):
            out = self.model(x)
        return out.float().cpu().numpy()

    def logits(self, x_float_nchw: np.ndarray | torch.Tensor) -> np.ndarray:
        x = torch.as_tensor(x_float_nchw, dtype=torch.float32)
        return self._forward(x.to(self.device, non_blocking=True))

    def logits_uint8(self, batch_uint8: np.ndarray, normalize: Callable[[Any], Any]) -> np.ndarray:
        """uint8 (N, C, H, W) -> logits, normalized on the device by ``normalize``."""
        x = torch.from_numpy(np.ascontiguousarray(batch_uint8))
        if self.device.type == "cuda":
            x = x.pin_memory()
        return self._forward(normalize(x.to(self.device, non_blocking=True)))

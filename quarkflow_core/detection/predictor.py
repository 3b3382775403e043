"""Serving a detector: ``DetectionPredictor``, the one object the API, the Gradio demo, the
batch flow and evaluation call, on the eager model or its checked ONNX export.

Boxes come back in the pixels of the image given, as the contract's dicts, sorted by score
and kept down to a low floor (``SCORE_FLOOR``): the service logs the ones near the model's
threshold for review, and ``threshold()`` says which of them to show."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image as PILImage

from quarkflow_core import __version__
from quarkflow_core.detection.artifacts import LoadedDetector, load_detector_artifact
from quarkflow_core.errors import InvalidInput

SCORE_FLOOR = 0.05
# the classification Predictor's names (QF_SERVING_BACKEND) and the short ones both work
BACKENDS = {
    "auto": "auto",
    "torch": "eager",
    "eager": "eager",
    "onnx": "onnxruntime",
    "onnxruntime": "onnxruntime",
    "cuda": "cuda",
}


@dataclass
class DetectionPredictor:
    """A loaded, verified detector version and the backend that runs it."""

    version: int | None
    sha256: str | None
    architecture: str
    classes: list[str]
    score_threshold: float
    image_size: int
    backend_name: str  # "eager" | "onnxruntime" | "cuda"
    runner: Any  # nn.Module (eager, cuda) or export.OnnxDetector
    score_floor: float = SCORE_FLOOR
    device: str = "cpu"
    backend_note: str | None = None  # why this backend (or why not the one asked for)
    fallback: bool = False
    loaded_at: float = field(default_factory=time.time)
    task: str = "detection"
    # one request at a time through the model: torch modules and onnxruntime sessions are
    # safe to share, but an eager detector's eval-mode switch and torch's thread pool are not
    # worth racing for on a CPU that a single request already fills
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    @classmethod
    def from_loaded(
        cls,
        loaded: LoadedDetector,
        *,
        version: int | None = None,
        sha256: str | None = None,
        backend: str = "torch",
        threads: int | None = None,
        cuda: Any = None,
    ) -> DetectionPredictor:
        from quarkflow_core.detection.export import ONNX_FILE, OnnxDetector

        if backend not in BACKENDS:
            raise InvalidInput(
                f"unknown serving backend {backend!r}; valid: {', '.join(sorted(BACKENDS))}"
            )
        from quarkflow_core.ml.backends import choose_backend, cuda_status

        onnx = loaded.path / ONNX_FILE
        if BACKENDS[backend] == "onnxruntime" and not onnx.is_file():
            raise InvalidInput(
                f"{loaded.path} has no ONNX export; export it first "
                "(detection.export.export_detector_onnx) or serve it with the torch backend"
            )
        probe = cuda or cuda_status
        choice = choose_backend(BACKENDS[backend], has_onnx=onnx.is_file(), cuda=probe)
        runner: Any = None
        if choice.kind == "cuda":
            try:
                runner = loaded.model.to("cuda").eval()
            except Exception as exc:  # a GPU that cannot take the model: serve on the CPU
                cpu = choose_backend("onnxruntime" if onnx.is_file() else "eager", has_onnx=True)
                choice = cpu.with_fallback(
                    f"the detector did not start on CUDA: {type(exc).__name__}: {exc}"[:400]
                )
        if runner is None and choice.kind == "onnxruntime":
            if "onnx" not in loaded.manifest.get("exports", {}):
                raise InvalidInput(f"{onnx} is not recorded in the manifest; it is not served")
            runner = OnnxDetector(onnx, threads=threads)
        elif runner is None:
            runner = loaded.model.cpu().eval()
        name = choice.kind
        return cls(
            version=version,
            sha256=sha256,
            architecture=loaded.architecture,
            classes=list(loaded.classes),
            score_threshold=float(loaded.score_threshold),
            image_size=loaded.image_size,
            backend_name=name,
            runner=runner,
            device="cuda" if name == "cuda" else "cpu",
            backend_note=choice.fallback or choice.reason,
            fallback=choice.fallback is not None,
        )

    @classmethod
    def from_artifact(cls, path: str | Path, **kwargs: Any) -> DetectionPredictor:
        """Verify (every file's hash) and load; ``kwargs`` go to ``from_loaded``."""
        from quarkflow_core.ml.artifacts import manifest_sha256

        sha = manifest_sha256(path)
        loaded = load_detector_artifact(path, expected_sha256=sha)
        return cls.from_loaded(loaded, sha256=sha, **kwargs)

    def threshold(self, override: float | None = None) -> float:
        """The score from which a box is shown: ``override`` when set, else the model's own
        (chosen on validation when it was trained, from its manifest)."""
        return self.score_threshold if override is None else float(override)

    def detections(self, image: np.ndarray) -> dict[str, np.ndarray]:
        """Arrays {"boxes", "scores", "labels"} for one uint8 (H, W, 3) RGB image."""
        if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
            raise InvalidInput("the image must be a uint8 numpy array")
        if image.ndim != 3 or image.shape[2] != 3 or min(image.shape[:2]) < 1:
            raise InvalidInput(f"the image must be (H, W, 3) RGB, got shape {image.shape}")
        with self._lock:
            if self.backend_name == "onnxruntime":
                return self.runner.run(image, score_floor=self.score_floor)
            from quarkflow_core.detection.train import detect

            return detect(self.runner, [image], device=self.device, score_floor=self.score_floor)[0]

    def predict_array(self, image: np.ndarray) -> list[dict[str, Any]]:
        """[{"label", "score", "box": [x1, y1, x2, y2]}] in the image's pixels, scores
        descending, every box over the score floor (compare with ``threshold()``)."""
        found = self.detections(image)
        return [
            {
                "label": self.classes[int(label)],
                "score": round(float(score), 4),
                "box": [round(float(v), 2) for v in box],
            }
            for box, score, label in zip(
                found["boxes"], found["scores"], found["labels"], strict=True
            )
        ]

    def predict_bytes(self, data: bytes) -> list[dict[str, Any]]:
        """``predict_array`` on encoded image bytes, validated and decoded as uploads are
        (allowed formats, size and pixel limits), as RGB."""
        from quarkflow_core.images import decode_image

        _, img = decode_image(data)
        return self.predict_array(np.asarray(img.convert("RGB"), dtype=np.uint8))

    def predict_image(self, img: PILImage.Image) -> list[dict[str, Any]]:
        """``predict_array`` on a decoded PIL image (any mode; converted to RGB)."""
        return self.predict_array(np.asarray(img.convert("RGB"), dtype=np.uint8))

    def warm_up(self, runs: int = 2) -> None:
        """A few passes on a blank image, so the first request does not pay for lazy init."""
        blank = np.zeros((self.image_size, self.image_size, 3), dtype=np.uint8)
        for _ in range(runs):
            self.detections(blank)

    def describe(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "version": self.version,
            "sha256": self.sha256,
            "architecture": self.architecture,
            "backend": self.backend_name,
            "device": self.device,
            "backend_note": self.backend_note,
            "classes": self.classes,
            "score_threshold": self.score_threshold,
            "image_size": self.image_size,
            "quarkflow": __version__,
            "torch": torch.__version__,
        }

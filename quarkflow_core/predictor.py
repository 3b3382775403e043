"""Serving a model: one ``Predictor`` (used by the API, the Gradio demo, the batch flow and
evaluation), a dynamic ``MicroBatcher`` for concurrent requests, and the ``ModelHolder`` +
``ChampionWatcher`` pair that swaps in a newly approved champion with no failed request.

A request is preprocessed for the predictor that is current when it arrives, and runs on that
same predictor even if a swap happens meanwhile: in-flight requests finish on the old model.
"""

from __future__ import annotations

import io
import json
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image as PILImage

from quarkflow_core.errors import InvalidInput, QuarkflowError
from quarkflow_core.ml.artifacts import LoadedModel, load_artifact
from quarkflow_core.ml.transforms import Preprocess

log = logging.getLogger("quarkflow.serving")
BACKENDS = ("auto", "eager", "onnxruntime")


@dataclass
class Predictor:
    """A loaded, verified model version and the backend that runs it."""

    version: int | None
    sha256: str
    classes: list[str]
    preset: Preprocess
    temperature: float
    backend: Any
    backend_name: str
    review_threshold: float | None = None
    loaded_at: float = field(default_factory=time.time)

    def threshold(self, override: float | None = None) -> float:
        """The calibrated confidence below which a prediction goes to review: ``override``
        (QF_REVIEW_THRESHOLD) when set, else this model's own (from its manifest: the lowest
        confidence at which validation accuracy stays >= 99%), else 0.8."""
        if override is not None:
            return override
        return self.review_threshold if self.review_threshold is not None else 0.8

    @classmethod
    def from_loaded(
        cls,
        loaded: LoadedModel,
        *,
        version: int | None,
        sha256: str,
        backend: str = "auto",
        threads: int | None = None,
    ) -> Predictor:
        from quarkflow_core.ml.export import load_backend

        if backend not in BACKENDS:
            raise InvalidInput(f"unknown serving backend {backend!r}; valid: {', '.join(BACKENDS)}")
        onnx = loaded.path / "model.onnx"
        if backend == "onnxruntime" and not onnx.is_file():
            raise InvalidInput(
                f"v{version} has no ONNX export; run `quarkflow export` before registering it, "
                "or serve it with the eager backend"
            )
        if backend == "onnxruntime" or (backend == "auto" and onnx.is_file()):
            runner, name = load_backend("onnxruntime", onnx, threads=threads), "onnxruntime"
        else:
            runner, name = load_backend("eager", loaded.model), "eager"
        threshold = loaded.manifest.get("metrics", {}).get("review_threshold", {}).get("threshold")
        return cls(
            version=version,
            sha256=sha256,
            classes=list(loaded.classes),
            preset=loaded.preset,
            temperature=float(loaded.temperature),
            backend=runner,
            backend_name=name,
            review_threshold=threshold,
        )

    @classmethod
    def from_artifact(cls, path: str | Path, **kwargs: Any) -> Predictor:
        from quarkflow_core.ml.artifacts import manifest_sha256

        sha = manifest_sha256(path)
        return cls.from_loaded(load_artifact(path, expected_sha256=sha), sha256=sha, **kwargs)

    def preprocess(self, data: bytes) -> np.ndarray:
        """Validated image bytes -> uint8 (C, H, W) at this model's preset."""
        with PILImage.open(io.BytesIO(data)) as img:
            return self.preprocess_image(img)

    def preprocess_image(self, img: PILImage.Image) -> np.ndarray:
        """A decoded image -> uint8 (C, H, W) at this model's preset."""
        return self.preset.to_array(img).transpose(2, 0, 1)

    def probabilities(self, batch_uint8: np.ndarray) -> np.ndarray:
        """uint8 (N, C, H, W) -> calibrated probabilities (N, classes)."""
        x = self.preset.normalize(torch.from_numpy(np.ascontiguousarray(batch_uint8)))
        logits = torch.from_numpy(np.asarray(self.backend.logits(x.numpy())))
        return torch.softmax(logits / self.temperature, 1).numpy()

    def warm_up(self, runs: int = 3) -> None:
        shape = (1, self.preset.channels, self.preset.size, self.preset.size)
        for _ in range(runs):
            self.probabilities(np.zeros(shape, dtype=np.uint8))

    def describe(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "sha256": self.sha256,
            "backend": self.backend_name,
            "classes": self.classes,
            "preset": self.preset.name,
        }


def summarize(probs: np.ndarray, classes: list[str], k: int = 5) -> dict[str, Any]:
    """label, confidence, top-k, and the uncertainty measures the review queue ranks by."""
    order = np.argsort(-probs)
    top = [{"label": classes[i], "confidence": float(probs[i])} for i in order[:k]]
    second = float(probs[order[1]]) if len(order) > 1 else 0.0
    p = np.clip(probs.astype(np.float64), 1e-12, 1.0)
    entropy = float(-(p * np.log(p)).sum() / np.log(len(probs))) if len(probs) > 1 else 0.0
    return {
        "label": classes[order[0]],
        "confidence": float(probs[order[0]]),
        "topk": top,
        "margin": float(probs[order[0]]) - second,
        "entropy": entropy,
    }


class ModelHolder:
    """The predictor being served. Swapping is one reference assignment."""

    def __init__(self) -> None:
        self._current: Predictor | None = None
        self.swaps = 0
        self.listeners: list[Callable[[Predictor], None]] = []

    @property
    def current(self) -> Predictor | None:
        return self._current

    def swap(self, predictor: Predictor) -> None:
        old = self._current
        self._current = predictor
        self.swaps += 1
        log.info(
            "serving v%s (%s) instead of %s",
            predictor.version,
            predictor.backend_name,
            f"v{old.version}" if old else "nothing",
        )
        for listener in self.listeners:
            listener(predictor)


class NoModel(QuarkflowError):
    code = "no_model"


@dataclass
class _Job:
    array: np.ndarray
    predictor: Predictor
    future: Future


class MicroBatcher:
    """Collects concurrent requests into batches: up to ``max_batch`` items, waiting at most
    ``max_wait_ms`` after the first one. Items are grouped by the predictor they were
    preprocessed for, so a swap never mixes models inside a batch."""

    def __init__(
        self,
        *,
        max_batch: int = 32,
        max_wait_ms: float = 1.0,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        self.max_batch = max(1, max_batch)
        self.max_wait_s = max(0.0, max_wait_ms) / 1000.0
        self.on_batch = on_batch
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="qf-batcher", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=10)
            self._thread = None

    def submit(self, array: np.ndarray, predictor: Predictor) -> Future:
        fut: Future = Future()
        if self._thread is None:  # not started: run inline (batch flow, evaluation)
            fut.set_result(predictor.probabilities(array[None])[0])
            return fut
        self._queue.put(_Job(array, predictor, fut))
        return fut

    def _collect(self, first: _Job) -> list[_Job]:
        jobs = [first]
        deadline = time.perf_counter() + self.max_wait_s
        while len(jobs) < self.max_batch:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    break
                try:
                    job = self._queue.get(timeout=remaining)
                except queue.Empty:
                    break
            if job is None:
                self._queue.put(None)
                break
            jobs.append(job)
        return jobs

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            jobs = self._collect(first)
            groups: dict[int, list[_Job]] = {}
            for job in jobs:
                groups.setdefault(id(job.predictor), []).append(job)
            for group in groups.values():
                try:
                    probs = group[0].predictor.probabilities(np.stack([j.array for j in group]))
                    for job, row in zip(group, probs, strict=True):
                        job.future.set_result(row)
                except Exception as exc:  # handed to every waiting request
                    for job in group:
                        job.future.set_exception(exc)
                if self.on_batch:
                    self.on_batch(len(group))


def write_pointer(path: Path, predictor: Predictor, artifact_path: Path, **extra: Any) -> None:
    """Remember what is served, so a restart with the database down serves the same model
    (one pointer per project; ``extra``: e.g. the project's id and name)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    served = {"version": predictor.version, "sha256": predictor.sha256, "path": str(artifact_path)}
    tmp.write_text(json.dumps({**served, **extra}))
    tmp.replace(path)


def read_pointer(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None

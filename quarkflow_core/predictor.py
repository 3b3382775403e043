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
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image as PILImage

from quarkflow_core.errors import QuarkflowError
from quarkflow_core.ml.artifacts import LoadedModel, load_artifact
from quarkflow_core.ml.transforms import Preprocess

log = logging.getLogger("quarkflow.serving")


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
    device: str = "cpu"
    backend_note: str | None = None  # why this backend (or why not the one asked for)
    fallback: bool = False  # the backend asked for (or preferred) could not be used
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
        cuda: Callable[[], tuple[bool, str]] | None = None,
    ) -> Predictor:
        """``backend``: QF_SERVING_BACKEND (``ml.backends.choose_backend`` decides; ``cuda``
        probes the GPU, ``ml.backends.cuda_status`` by default). A GPU that cannot start the
        model falls back to the CPU choice, with the reason in ``backend_note``."""
        from quarkflow_core.ml.backends import (
            BackendUnavailable,
            TorchDeviceBackend,
            choose_backend,
            cuda_status,
        )
        from quarkflow_core.ml.export import load_backend

        onnx = loaded.path / "model.onnx"
        requires = (loaded.manifest.get("serving") or {}).get("requires")
        probe = cuda or cuda_status
        choice = choose_backend(backend, has_onnx=onnx.is_file(), requires=requires, cuda=probe)
        runner: Any = None
        if choice.kind == "cuda":
            try:
                shape = (1, loaded.preset.channels, loaded.preset.size, loaded.preset.size)
                runner = TorchDeviceBackend(loaded.model, device="cuda", example_shape=shape)
            except BackendUnavailable as exc:
                log.warning("serving v%s on the CPU: %s", version, exc)
                cpu = choose_backend(
                    "onnxruntime" if onnx.is_file() else "eager", has_onnx=onnx.is_file()
                )
                choice = cpu.with_fallback(str(exc))
        if runner is None and choice.kind == "onnxruntime":
            runner = load_backend("onnxruntime", onnx, threads=threads)
        elif runner is None:
            runner = load_backend("eager", loaded.model)
        threshold = loaded.manifest.get("metrics", {}).get("review_threshold", {}).get("threshold")
        return cls(
            version=version,
            sha256=sha256,
            classes=list(loaded.classes),
            preset=loaded.preset,
            temperature=float(loaded.temperature),
            backend=runner,
            backend_name=choice.kind,
            review_threshold=threshold,
            device=choice.device,
            backend_note=choice.fallback or choice.reason,
            fallback=choice.fallback is not None,
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
        if getattr(self.backend, "takes_uint8", False):
            raw = self.backend.logits_uint8(batch_uint8, self.preset.normalize)
        else:
            x = self.preset.normalize(torch.from_numpy(np.ascontiguousarray(batch_uint8)))
            raw = self.backend.logits(x.numpy())
        logits = torch.from_numpy(np.asarray(raw))
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
            "device": self.device,
            "backend_note": self.backend_note,
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


class _Announced:
    """Requests announced to a ``MicroBatcher`` (``coming``) and not yet submitted."""

    def __init__(self, n: int) -> None:
        self.left = n


class MicroBatcher:
    """Collects concurrent requests into batches of up to ``max_batch`` items. Items are
    grouped by the predictor they were preprocessed for, so a swap never mixes models inside a
    batch.

    How long a batch waits to fill: with ``adaptive_wait_ms`` 0, a fixed ``max_wait_ms`` after
    its first item. Adaptive (``adaptive_wait_ms`` > 0): the batcher waits only while more
    requests are known to be on their way (announced with ``coming`` while they are decoded,
    not yet submitted), and at most ``adaptive_wait_ms`` or half the model's recent time per
    batch, whichever is less. A lone request runs at once (no blind wait); on a busy server a
    batch takes in the requests that were being decoded while the previous batch ran, instead
    of leaving them for a small batch of their own. Waiting costs little there: the cores the
    model leaves idle meanwhile are decoding those very requests."""

    def __init__(
        self,
        *,
        max_batch: int = 32,
        max_wait_ms: float = 1.0,
        on_batch: Callable[[int], None] | None = None,
        adaptive_wait_ms: float = 0.0,
    ) -> None:
        self.max_batch = max(1, max_batch)
        self.max_wait_s = max(0.0, max_wait_ms) / 1000.0
        self.adaptive_s = max(0.0, adaptive_wait_ms) / 1000.0
        self.on_batch = on_batch
        self.run_s: float | None = None  # moving average of the model's time per batch
        self._coming = 0  # announced (``coming``), not yet submitted
        self._lock = threading.Lock()
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

    @contextmanager
    def coming(self, n: int = 1) -> Iterator[_Announced]:
        """Announce ``n`` requests being prepared (decoded) for this batcher; pass what this
        yields to ``submit`` as ``announced``. Those not submitted when the block ends (a bad
        upload) are counted off then."""
        announced = _Announced(max(0, n))
        with self._lock:
            self._coming += announced.left
        try:
            yield announced
        finally:
            with self._lock:
                self._coming -= announced.left
                announced.left = 0

    def submit(
        self, array: np.ndarray, predictor: Predictor, *, announced: _Announced | None = None
    ) -> Future:
        fut: Future = Future()
        if announced is not None and announced.left > 0:
            with self._lock:
                self._coming -= 1
                announced.left -= 1
        if self._thread is None:  # not started: run inline (batch flow, evaluation)
            fut.set_result(predictor.probabilities(array[None])[0])
            return fut
        self._queue.put(_Job(array, predictor, fut))
        return fut

    def _deadline(self, start: float) -> float:
        if not self.adaptive_s:
            return start + self.max_wait_s
        cap = self.adaptive_s if self.run_s is None else min(self.adaptive_s, self.run_s / 2)
        return start + cap

    def _collect(self, first: _Job) -> list[_Job]:
        jobs = [first]
        deadline = self._deadline(time.perf_counter())
        while len(jobs) < self.max_batch:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                remaining = deadline - time.perf_counter()
                if remaining <= 0 or (self.adaptive_s and self._coming <= 0):
                    break
                try:  # adaptive: look again every 2 ms whether more are still coming
                    job = self._queue.get(
                        timeout=min(remaining, 0.002) if self.adaptive_s else remaining
                    )
                except queue.Empty:
                    continue
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
                started = time.perf_counter()
                try:
                    probs = group[0].predictor.probabilities(np.stack([j.array for j in group]))
                    for job, row in zip(group, probs, strict=True):
                        if not job.future.done():  # a waiter may have given up (cancelled)
                            job.future.set_result(row)
                except Exception as exc:  # handed to every waiting request
                    for job in group:
                        if not job.future.done():
                            job.future.set_exception(exc)
                took = time.perf_counter() - started
                self.run_s = took if self.run_s is None else 0.8 * self.run_s + 0.2 * took
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

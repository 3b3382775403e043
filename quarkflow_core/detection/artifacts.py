"""Detector artifacts: the same self-describing folder as ``ml.artifacts`` (weights +
``manifest.json`` with the sha256 of every file, verified before anything is unpickled, weights
loaded with ``weights_only=True``), with a manifest that says ``"task": "detection"``.

The manifest carries what rebuilds and serves the model without the training code's config:
architecture, classes, image size, whether the backbone's batch norm is frozen (part of the
module structure), and the score threshold above which a box is shown.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quarkflow_core import __version__
from quarkflow_core.detection.models import get_detector, model_image_size
from quarkflow_core.errors import InvalidInput
from quarkflow_core.ml.artifacts import (
    MANIFEST,
    WEIGHTS,
    ArtifactIntegrityError,
    _write_manifest,
    git_commit,
    manifest_sha256,
    verify_artifact,
)

TASK = "detection"
FORMAT_VERSION = 1

__all__ = [
    "MANIFEST",
    "TASK",
    "WEIGHTS",
    "ArtifactIntegrityError",
    "LoadedDetector",
    "load_detector_artifact",
    "save_detector_artifact",
]


@dataclass
class LoadedDetector:
    model: nn.Module
    classes: list[str]
    score_threshold: float
    manifest: dict[str, Any]
    path: Path
    architecture: str

    @property
    def image_size(self) -> int:
        return int(self.manifest["image_size"])


def _frozen_norm(model: nn.Module) -> bool:
    """Whether the detector was built with frozen batch norm (a pretrained backbone)."""
    from torchvision.ops.misc import FrozenBatchNorm2d

    return any(isinstance(m, FrozenBatchNorm2d) for m in model.modules())


def save_detector_artifact(
    out_dir: str | Path,
    *,
    model: nn.Module,
    architecture: str,
    classes: list[str],
    config: dict[str, Any],
    score_threshold: float,
    metrics: dict[str, Any] | None = None,
    training: dict[str, Any] | None = None,
    dataset: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> str:
    """Write weights + manifest into ``out_dir`` (created; must be empty: artifacts are
    immutable). ``config`` is the resolved ``DetectorConfig.to_dict()``. Returns the manifest's
    sha256, which identifies the version."""
    out = Path(out_dir)
    if not classes:
        raise InvalidInput("a detector artifact needs its class list")
    if not 0.0 <= score_threshold <= 1.0:
        raise InvalidInput(f"score_threshold must be in [0, 1], got {score_threshold}")
    out.mkdir(parents=True, exist_ok=True)
    if any(out.iterdir()):
        raise InvalidInput(f"artifact folder {out} is not empty; artifacts are immutable")
    image_size = model_image_size(model)
    frozen = _frozen_norm(model)
    # a rebuild must accept these weights exactly, or the artifact would be unloadable later
    fresh = get_detector(
        architecture, num_classes=len(classes), image_size=image_size, frozen_norm=frozen
    )
    state = model.state_dict()
    if set(fresh.state_dict()) != set(state):
        raise InvalidInput(
            f"the model's weights do not match a {architecture} for {len(classes)} classes"
        )
    torch.save({"format": "state_dict", "state": state}, out / WEIGHTS)
    manifest = {
        "format_version": FORMAT_VERSION,
        "task": TASK,
        "architecture": architecture,
        "classes": list(classes),
        "num_classes": len(classes),
        "image_size": image_size,
        "frozen_norm": frozen,
        "score_threshold": float(score_threshold),
        "box_format": "xyxy pixels of the original image",
        "weights_format": "state_dict",
        "config": config,
        "metrics": metrics or {},
        "training": training or {},
        "dataset": dataset or {},
        "code": {"git_commit": git_commit(), "quarkflow": __version__, "torch": torch.__version__},
        "created_at": datetime.now(UTC).isoformat(),
        **(extra or {}),
    }
    return _write_manifest(out, manifest)


def load_detector_artifact(
    path: str | Path, *, expected_sha256: str | None = None
) -> LoadedDetector:
    """Verify every file's hash, then load. ``expected_sha256`` (from the registry) pins the
    manifest itself. A classification artifact is refused by name, not half-loaded."""
    folder = Path(path)
    manifest = verify_artifact(folder)
    if expected_sha256 is not None and manifest_sha256(folder) != expected_sha256:
        raise ArtifactIntegrityError(
            f"{folder}: manifest sha256 differs from the registered {expected_sha256[:12]}…"
        )
    if manifest.get("task") != TASK:
        raise InvalidInput(
            f"{folder} is a {manifest.get('task', 'classification')} artifact, not a detector"
        )
    weights = torch.load(folder / WEIGHTS, map_location="cpu", weights_only=True)
    if weights.get("format") != "state_dict":
        raise InvalidInput(f"{folder}: unknown detector weights format {weights.get('format')!r}")
    model = get_detector(
        manifest["architecture"],
        num_classes=int(manifest["num_classes"]),
        image_size=int(manifest["image_size"]),
        frozen_norm=bool(manifest["frozen_norm"]),
    )
    model.load_state_dict(weights["state"])
    model.eval()
    return LoadedDetector(
        model=model,
        classes=list(manifest["classes"]),
        score_threshold=float(manifest["score_threshold"]),
        manifest=manifest,
        path=folder,
        architecture=manifest["architecture"],
    )

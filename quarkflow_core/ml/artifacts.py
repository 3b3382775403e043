"""Self-describing model artifacts: a folder of files + ``manifest.json``.

The manifest names the architecture, classes, eval preprocessing, calibration temperature,
dataset snapshot, training config, metrics, code version and the sha256 of every file. Loading
verifies every hash and refuses a mismatch; weights load with ``weights_only=True``. The
sha256 of the manifest itself identifies the version (it covers every file through the hashes).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quarkflow_core import __version__
from quarkflow_core.errors import InvalidInput, QuarkflowError
from quarkflow_core.ml.models import count_parameters, get_model
from quarkflow_core.ml.transforms import Preprocess

MANIFEST = "manifest.json"
WEIGHTS = "weights.pt"
FORMAT_VERSION = 1


class ArtifactIntegrityError(QuarkflowError):
    code = "artifact_integrity"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def git_commit() -> str:
    """The code version the artifact was built from ('unknown' outside a git checkout)."""
    git = shutil.which("git")
    if git is None:
        return "unknown"
    try:
        out = subprocess.run(  # noqa: S603 - fixed arguments, no shell
            [git, "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parent,
            check=False,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@dataclass
class LoadedModel:
    model: nn.Module
    preset: Preprocess
    classes: list[str]
    temperature: float
    manifest: dict[str, Any]
    path: Path

    @property
    def architecture(self) -> str:
        return self.manifest["architecture"]


def _write_manifest(out: Path, manifest: dict[str, Any]) -> str:
    files = {}
    for f in sorted(out.iterdir()):
        if f.is_file() and f.name != MANIFEST:
            files[f.name] = {"sha256": sha256_file(f), "size": f.stat().st_size}
    manifest["files"] = files
    text = json.dumps(manifest, indent=2, sort_keys=True, default=str)
    (out / MANIFEST).write_text(text)
    return hashlib.sha256(text.encode()).hexdigest()


def save_artifact(
    out_dir: str | Path,
    *,
    model: nn.Module,
    architecture: str,
    classes: list[str],
    in_channels: int,
    preset: Preprocess,
    temperature: float = 1.0,
    metrics: dict[str, Any] | None = None,
    training: dict[str, Any] | None = None,
    dataset: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> str:
    """Write weights + manifest into ``out_dir`` (created; must be empty). Returns manifest sha."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if any(out.iterdir()):
        raise InvalidInput(f"artifact folder {out} is not empty; artifacts are immutable")
    fresh = get_model(architecture, num_classes=len(classes), in_channels=in_channels)
    if count_parameters(fresh) != count_parameters(model):  # channels were pruned away
        from quarkflow_core.ml.prune import pruned_state

        weights = {"format": "pruned", "state": pruned_state(model)}
    else:
        weights = {"format": "state_dict", "state": model.state_dict()}
    torch.save(weights, out / WEIGHTS)
    manifest = {
        "format_version": FORMAT_VERSION,
        "architecture": architecture,
        "classes": list(classes),
        "num_classes": len(classes),
        "in_channels": in_channels,
        "preprocess": preset.to_dict(),
        "temperature": temperature,
        "weights_format": weights["format"],
        "metrics": metrics or {},
        "training": training or {},
        "dataset": dataset or {},
        "code": {"git_commit": git_commit(), "quarkflow": __version__, "torch": torch.__version__},
        "created_at": datetime.now(UTC).isoformat(),
        **(extra or {}),
    }
    return _write_manifest(out, manifest)


def add_files(artifact_dir: str | Path, names: list[str], **manifest_updates: Any) -> str:
    """Record files written next to an unregistered artifact (exports) in its manifest."""
    out = Path(artifact_dir)
    manifest = verify_artifact(out, allow_extra=set(names))
    manifest.update(manifest_updates)
    return _write_manifest(out, manifest)


def verify_artifact(path: str | Path, *, allow_extra: set[str] = frozenset()) -> dict[str, Any]:
    """Check every file against the manifest; raise ArtifactIntegrityError on any mismatch."""
    folder = Path(path)
    mpath = folder / MANIFEST
    if not mpath.is_file():
        raise ArtifactIntegrityError(f"{folder} is not a model artifact (no {MANIFEST})")
    try:
        manifest = json.loads(mpath.read_text())
    except json.JSONDecodeError as exc:
        raise ArtifactIntegrityError(f"{mpath} is not valid JSON: {exc}") from None
    listed = manifest.get("files", {})
    for name, meta in listed.items():
        f = folder / name
        if not f.is_file():
            raise ArtifactIntegrityError(f"{folder}: file {name} listed in the manifest is missing")
        actual = sha256_file(f)
        if actual != meta["sha256"]:
            raise ArtifactIntegrityError(
                f"{folder}: {name} has sha256 {actual[:12]}…, the manifest says "
                f"{meta['sha256'][:12]}…; the artifact was modified and will not be loaded"
            )
    present = {f.name for f in folder.iterdir() if f.is_file()} - {MANIFEST}
    unlisted = present - set(listed) - set(allow_extra)
    if unlisted:
        raise ArtifactIntegrityError(f"{folder}: files not in the manifest: {sorted(unlisted)}")
    return manifest


def manifest_sha256(path: str | Path) -> str:
    return hashlib.sha256((Path(path) / MANIFEST).read_bytes()).hexdigest()


def load_artifact(path: str | Path, *, expected_sha256: str | None = None) -> LoadedModel:
    """Verify and load. ``expected_sha256`` (from the registry) pins the manifest itself."""
    folder = Path(path)
    manifest = verify_artifact(folder)
    if expected_sha256 is not None and manifest_sha256(folder) != expected_sha256:
        raise ArtifactIntegrityError(
            f"{folder}: manifest sha256 differs from the registered {expected_sha256[:12]}…"
        )
    weights = torch.load(folder / WEIGHTS, map_location="cpu", weights_only=True)
    arch, nc, ch = manifest["architecture"], manifest["num_classes"], manifest["in_channels"]
    if weights["format"] == "pruned":
        from quarkflow_core.ml.prune import load_pruned

        model = load_pruned(arch, nc, ch, weights["state"])
    else:
        model = get_model(arch, num_classes=nc, in_channels=ch)
        model.load_state_dict(weights["state"])
    model.eval()
    return LoadedModel(
        model=model,
        preset=Preprocess.from_dict(manifest["preprocess"]),
        classes=list(manifest["classes"]),
        temperature=float(manifest.get("temperature", 1.0)),
        manifest=manifest,
        path=folder,
    )

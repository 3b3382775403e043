"""Immutable versions: registering an artifact folder, and getting a verified copy back.

A version is registered once. Its files are uploaded to storage under
``models/<manifest sha256>/`` *before* its row is inserted, manifest last, so a crash leaves at
most unreferenced blobs, never a half-registered version; re-registering the same artifact
returns the existing version. Every file is checked against its sha256 (and the manifest
against the registered sha256) whenever a version is read back: ``verify_stored`` before a
promotion or rollback, ``materialize`` / ``load_version`` before serving or comparing, into the
local cache that ``model_cache_dir`` names.

Versions belong to a project and are numbered within it (v1, v2, ... per project); the same
artifact may be registered in two projects (two versions, one set of stored files).

``register_version`` commits by design, under the registry lock, with its audit row (see
``quarkflow_core.database``)."""

from __future__ import annotations

import hashlib
import json
import shutil
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from quarkflow_core.errors import ObjectNotFound
from quarkflow_core.ml.artifacts import (
    MANIFEST,
    ArtifactIntegrityError,
    manifest_sha256,
    verify_artifact,
)
from quarkflow_core.projects import check_same_classes, ensure_classes, get_project
from quarkflow_core.registry.events import _lock, set_challenger
from quarkflow_core.schema import (
    DEFAULT_PROJECT_ID,
    DatasetSnapshot,
    ModelVersion,
    TrainingRun,
    json_safe,
)
from quarkflow_core.storage import Storage
from quarkflow_core.users import record_audit

if TYPE_CHECKING:
    from quarkflow_core.config import Settings


def model_cache_dir(settings: Settings | None = None) -> Path:
    """The local folder versions are materialised into, ``<QF_DATA_DIR>/model-cache``: one for
    the API, CLI, workbench and flows, so a version verified and downloaded once is reused.
    ``settings`` defaults to ``get_settings()``."""
    if settings is None:
        from quarkflow_core.config import get_settings

        settings = get_settings()
    return Path(settings.data_dir) / "model-cache"


def _headline(metrics: dict[str, Any]) -> dict[str, Any]:
    if metrics.get("task") == "detection":
        from quarkflow_core.detection.training import detection_headline

        return detection_headline(metrics)
    from quarkflow_core.training_runs import headline

    return headline(metrics)


def storage_prefix(sha256: str) -> str:
    return f"models/{sha256}"


def register_version(
    *,
    session: Session,
    storage: Storage,
    artifact_dir: str | Path,
    created_by: str,
    as_challenger: bool = False,
    project_id: int = DEFAULT_PROJECT_ID,
) -> ModelVersion:
    """Upload a verified artifact folder and record it as the project's next version
    (idempotent within the project). A project created without classes takes its first
    version's (``projects.ensure_classes``)."""
    get_project(session=session, ref=project_id)  # NotFound for an unknown project
    folder = Path(artifact_dir)
    manifest = verify_artifact(folder)
    sha = manifest_sha256(folder)

    def registered(sha256: str) -> ModelVersion | None:
        return session.scalar(
            select(ModelVersion).where(
                ModelVersion.project_id == project_id, ModelVersion.sha256 == sha256
            )
        )

    existing = registered(sha)
    if existing is None:
        check_same_classes(
            session=session,
            project_id=project_id,
            classes=list(manifest["classes"]),
            what=f"the model in {folder}",
        )
        prefix = storage_prefix(sha)
        for name in sorted(manifest["files"]):
            storage.put(f"{prefix}/{name}", (folder / name).read_bytes(), overwrite=True)
        storage.put(
            f"{prefix}/{MANIFEST}",
            (folder / MANIFEST).read_bytes(),
            content_type="application/json",
            overwrite=True,
        )
        _lock(session)
        existing = registered(sha)
    if existing is not None:
        if as_challenger:
            set_challenger(
                session=session, version=existing, actor=created_by, project_id=project_id
            )
        return existing

    dataset, training = manifest.get("dataset", {}), manifest.get("training", {})
    snap_id = dataset.get("snapshot_id")
    run_id = training.get("run_id")
    parent_sha = manifest.get("parent", {}).get("manifest_sha256")
    parent = registered(parent_sha) if parent_sha else None
    snap = session.get(DatasetSnapshot, snap_id) if snap_id else None
    run = session.get(TrainingRun, run_id) if run_id else None
    number = (
        session.scalar(
            select(func.max(ModelVersion.version)).where(ModelVersion.project_id == project_id)
        )
        or 0
    ) + 1
    row = ModelVersion(
        project_id=project_id,
        version=number,
        architecture=manifest["architecture"],
        classes=list(manifest["classes"]),
        artifact_key=storage_prefix(sha),
        sha256=sha,
        metrics=json_safe(_headline(manifest.get("metrics", {}))),
        manifest=json_safe(manifest),
        snapshot_id=snap.id if snap is not None and snap.project_id == project_id else None,
        training_run_id=run.id if run is not None and run.project_id == project_id else None,
        parent_version_id=parent.id if parent else None,
        size_bytes=sum(int(f["size"]) for f in manifest["files"].values()),
        created_by=created_by,
    )
    session.add(row)
    session.flush()
    ensure_classes(session=session, project_id=project_id, classes=row.classes)
    record_audit(
        session=session,
        actor=None,
        action="models.register",
        outcome="ok",
        target_type="model_version",
        target_id=number,
        detail={
            "by": created_by,
            "sha256": sha,
            "architecture": row.architecture,
            "project_id": project_id,
        },
    )
    session.commit()
    if as_challenger:
        set_challenger(
            session=session,
            version=row,
            actor=created_by,
            reason="registered as challenger",
            project_id=project_id,
        )
    return row


def _download_verified(storage: Storage, row: ModelVersion) -> dict[str, bytes]:
    """Every file of a version, read from storage and checked against its sha256."""
    prefix = row.artifact_key
    try:
        manifest_bytes = storage.get(f"{prefix}/{MANIFEST}")
    except ObjectNotFound:
        raise ArtifactIntegrityError(
            f"v{row.version}: {MANIFEST} is missing from storage ({prefix}/)"
        ) from None
    if hashlib.sha256(manifest_bytes).hexdigest() != row.sha256:
        raise ArtifactIntegrityError(
            f"v{row.version}: the stored manifest no longer matches the registered sha256 "
            f"{row.sha256[:12]}…; the version will not be promoted or served"
        )
    files = {MANIFEST: manifest_bytes}
    for name, meta in sorted(json.loads(manifest_bytes)["files"].items()):
        try:
            data = storage.get(f"{prefix}/{name}")
        except ObjectNotFound:
            raise ArtifactIntegrityError(
                f"v{row.version}: {name} is missing from storage ({prefix}/)"
            ) from None
        actual = hashlib.sha256(data).hexdigest()
        if actual != meta["sha256"]:
            raise ArtifactIntegrityError(
                f"v{row.version}: {name} has sha256 {actual[:12]}…, registered as "
                f"{meta['sha256'][:12]}…; the version will not be promoted or served"
            )
        files[name] = data
    return files


def verify_stored(*, storage: Storage, row: ModelVersion) -> None:
    """Raise ArtifactIntegrityError unless every stored file matches its sha256."""
    _download_verified(storage, row)


def materialize(*, storage: Storage, row: ModelVersion, cache_root: str | Path) -> Path:
    """A verified local copy of the version (``cache_root/<sha256>``), downloaded if needed.

    A cached copy is re-verified; a tampered cache is replaced from storage."""
    root = Path(cache_root)
    dest = root / row.sha256
    if dest.is_dir():
        try:
            verify_artifact(dest)
            if manifest_sha256(dest) == row.sha256:
                return dest
        except ArtifactIntegrityError:
            pass
        shutil.rmtree(dest, ignore_errors=True)
    files = _download_verified(storage, row)
    tmp = root / f".tmp-{uuid.uuid4().hex}"
    tmp.mkdir(parents=True)
    try:
        for name, data in files.items():
            (tmp / name).write_bytes(data)
        try:
            tmp.rename(dest)
        except OSError:  # another process materialised it first
            if not (dest / MANIFEST).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def load_version(*, storage: Storage, row: ModelVersion, cache_root: str | Path):
    """Materialise, verify and load a version as an ml.artifacts.LoadedModel (a detector's
    as a detection.artifacts.LoadedDetector)."""
    from quarkflow_core.ml.artifacts import load_artifact

    path = materialize(storage=storage, row=row, cache_root=cache_root)
    if (row.manifest or {}).get("task") == "detection":
        from quarkflow_core.detection.artifacts import load_detector_artifact

        return load_detector_artifact(path, expected_sha256=row.sha256)
    return load_artifact(path, expected_sha256=row.sha256)

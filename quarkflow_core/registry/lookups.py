"""Read-only lookups: the alias names, resolving ``3`` / ``"v3"`` / ``"champion"`` to a version,
the aliases and versions as they stand, and the two views people read: a version's ``summary``
and its ``lineage`` (dataset snapshot -> training run -> version -> parents and children).

Everything is per project (``project_id``, default: the default project): a version, an
alias or a version number of another project is not found, exactly like an unknown one.

Nothing here writes; every other module of the registry builds on these."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from quarkflow_core.errors import InvalidInput, NotFound
from quarkflow_core.schema import (
    DEFAULT_PROJECT_ID,
    DatasetSnapshot,
    ModelAlias,
    ModelVersion,
    TrainingRun,
)

CHAMPION, CHALLENGER = "champion", "challenger"
ALIASES = (CHAMPION, CHALLENGER)


def in_project(row: ModelVersion, project_id: int) -> ModelVersion:
    """``row`` if it belongs to ``project_id``; another project's version is not found."""
    if row.project_id != project_id:
        raise NotFound(f"no model version v{row.version}")
    return row


def get_version(
    *, session: Session, ref: str | int | ModelVersion, project_id: int = DEFAULT_PROJECT_ID
) -> ModelVersion:
    """``3``, ``"3"``, ``"v3"``, ``"champion"`` or ``"challenger"`` of the project (a
    ``ModelVersion`` is checked to belong to it)."""
    if isinstance(ref, ModelVersion):
        return in_project(ref, project_id)
    text_ref = str(ref).strip().lower()
    if text_ref in ALIASES:
        alias = session.get(ModelAlias, (project_id, text_ref), populate_existing=True)
        if alias is None:
            raise NotFound(f"there is no {text_ref} yet")
        return session.get(ModelVersion, alias.version_id)
    number = text_ref[1:] if text_ref.startswith("v") else text_ref
    if not (number.isascii() and number.isdigit()) or len(number) > 9:
        raise InvalidInput(f"{ref!r} is not a version: use 3, v3, champion or challenger")
    row = session.scalar(
        select(ModelVersion).where(
            ModelVersion.project_id == project_id, ModelVersion.version == int(number)
        )
    )
    if row is None:
        raise NotFound(f"no model version v{number}")
    return row


def aliases(*, session: Session, project_id: int = DEFAULT_PROJECT_ID) -> dict[str, ModelVersion]:
    rows = session.execute(
        select(ModelAlias.alias, ModelVersion)
        .join(ModelVersion, ModelVersion.id == ModelAlias.version_id)
        .where(ModelAlias.project_id == project_id)
    ).all()
    return {alias: version for alias, version in rows}


def alias_of(
    *, session: Session, alias: str, project_id: int = DEFAULT_PROJECT_ID
) -> ModelVersion | None:
    row = session.get(ModelAlias, (project_id, alias), populate_existing=True)
    return None if row is None else session.get(ModelVersion, row.version_id)


def list_versions(*, session: Session, project_id: int = DEFAULT_PROJECT_ID) -> list[ModelVersion]:
    return list(
        session.scalars(
            select(ModelVersion)
            .where(ModelVersion.project_id == project_id)
            .order_by(ModelVersion.version)
        )
    )


def summary(row: ModelVersion, *, session: Session | None = None) -> dict[str, Any]:
    """The few facts people scan: number, sha, architecture, headline metrics, lineage ids."""
    parent = None
    if row.parent_version_id is not None and session is not None:
        parent = session.get(ModelVersion, row.parent_version_id).version
    return {
        "version": row.version,
        "sha256": row.sha256,
        "architecture": row.architecture,
        "classes": list(row.classes),
        "metrics": dict(row.metrics),
        "snapshot_id": row.snapshot_id,
        "training_run_id": row.training_run_id,
        "parent_version": parent,
        "size_bytes": row.size_bytes,
        "created_by": row.created_by,
        "created_at": row.created_at.isoformat(),
    }


def lineage(*, session: Session, row: ModelVersion) -> dict[str, Any]:
    """dataset snapshot -> training run -> version -> parent version(s)."""
    snap = session.get(DatasetSnapshot, row.snapshot_id) if row.snapshot_id else None
    run = session.get(TrainingRun, row.training_run_id) if row.training_run_id else None
    parents = []
    seen = {row.id}
    cur = row
    while cur.parent_version_id is not None and cur.parent_version_id not in seen:
        cur = session.get(ModelVersion, cur.parent_version_id)
        seen.add(cur.id)
        parents.append({"version": cur.version, "sha256": cur.sha256})
    return {
        "snapshot": None
        if snap is None
        else {
            "id": snap.id,
            "name": snap.name,
            "content_hash": snap.content_hash,
            "class_counts": snap.class_counts,
        },
        "training_run": None
        if run is None
        else {
            "id": run.id,
            "status": run.status.value,
            "device": run.device,
            "started_at": run.started_at.isoformat() if run.started_at else None,
            "finished_at": run.finished_at.isoformat() if run.finished_at else None,
        },
        "version": row.version,
        "parents": parents,
        "children": [
            v.version
            for v in session.scalars(
                select(ModelVersion).where(ModelVersion.parent_version_id == row.id)
            )
        ],
    }

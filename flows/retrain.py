"""`retrain`: snapshot -> train -> (prune) -> export -> (INT8) -> register the challenger +
comparison.

Every task calls one quarkflow_core.pipeline function; retries only where a retry is safe
(every step is; ``register`` is idempotent). Progress and the final report are Prefect
artifacts. The run works in one project (parameter ``project``, default ``default``): its
labels, snapshot, training run, versions and champion."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from prefect import flow, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    update_progress_artifact,
)

from flows.common import data_dir, db, resolve_project, storage
from quarkflow_core import pipeline as core
from quarkflow_core.config import get_settings
from quarkflow_core.schema import DEFAULT_PROJECT


@task(name="snapshot", retries=2, retry_delay_seconds=2)
def snapshot_task(project_id: int) -> dict[str, Any]:
    from quarkflow_core.labels import build_training_snapshot

    with db() as s:
        _, _, report = build_training_snapshot(
            session=s, holdout_share=get_settings().holdout_share, project_id=project_id
        )
    return report


@task(name="find-existing")
def existing_task(
    snapshot_id: int, spec: core.RetrainSpec, project_id: int
) -> tuple[str, int | None]:
    with db() as s:
        key = core.snapshot_key(
            session=s, snapshot_id=snapshot_id, spec=spec, project_id=project_id
        )
        row = core.existing_candidate(session=s, key=key, project_id=project_id)
        return key, row.version if row else None


@task(name="train", retries=2, retry_delay_seconds=1)
def train_task(snapshot_id: int, spec: core.RetrainSpec, project_id: int) -> dict[str, Any]:
    bar = create_progress_artifact(progress=0.0, description=f"training {spec.architecture}")

    def on_progress(ev: Any) -> None:
        if ev.stage == "epoch":
            update_progress_artifact(bar, progress=100.0 * ev.epoch / ev.epochs)

    with db() as s:
        out = core.train_step(
            session=s,
            storage=storage(),
            snapshot_id=snapshot_id,
            spec=spec,
            out_root=data_dir() / "artifacts" / "retrain",
            progress=on_progress,
            project_id=project_id,
        )
    update_progress_artifact(bar, progress=100.0)
    return out


@task(name="prune", retries=1)
def prune_task(
    artifact_dir: str, snapshot_id: int, spec: core.RetrainSpec, project_id: int
) -> dict[str, Any]:
    with db() as s:
        return core.prune_step(
            session=s,
            storage=storage(),
            artifact_dir=artifact_dir,
            snapshot_id=snapshot_id,
            spec=spec,
            project_id=project_id,
        )


@task(name="quantize", retries=1)
def quantize_task(artifact_dir: str, snapshot_id: int, project_id: int) -> dict[str, Any]:
    """The INT8 variant, or ``{"refused": why}`` when it loses too much accuracy (not retried:
    the same model and data would be refused again)."""
    from quarkflow_core.errors import InvalidInput

    with db() as s:
        try:
            return core.quantize_step(
                session=s,
                storage=storage(),
                artifact_dir=artifact_dir,
                snapshot_id=snapshot_id,
                project_id=project_id,
            )
        except InvalidInput as exc:
            return {"refused": exc.detail}


@task(name="export", retries=1)
def export_task(artifact_dir: str, snapshot_id: int, fmt: str, project_id: int) -> float:
    with db() as s:
        return core.export_step(
            session=s,
            storage=storage(),
            artifact_dir=artifact_dir,
            snapshot_id=snapshot_id,
            fmt=fmt,
            project_id=project_id,
        )


@task(name="register", retries=2, retry_delay_seconds=2)
def register_task(
    key: str, artifact_dir: str, parent_dir: str | list[str] | None, project_id: int
) -> dict[str, Any]:
    from quarkflow_core.registry import PolicyConfig, model_cache_dir

    with db() as s:
        return core.register_step(
            session=s,
            storage=storage(),
            key=key,
            artifact_dir=artifact_dir,
            parent_dir=parent_dir,
            actor="flow:retrain",
            cache_root=model_cache_dir(),
            policy=PolicyConfig.for_project(session=s, project_id=project_id),
            project_id=project_id,
        )


@task(name="judge-existing")
def judge_task(version: int, project_id: int) -> dict[str, Any]:
    from quarkflow_core.registry import PolicyConfig, get_version, model_cache_dir

    with db() as s:
        return core.judge(
            session=s,
            storage=storage(),
            row=get_version(session=s, ref=version, project_id=project_id),
            cache_root=model_cache_dir(),
            policy=PolicyConfig.for_project(session=s, project_id=project_id),
            project_id=project_id,
        )


@flow(name="retrain", log_prints=True)
def retrain(
    architecture: str | None = None,
    epochs: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    augment: str | None = None,
    seed: int = 0,
    device: str = "auto",
    kfold: int = 0,
    prune_ratio: float | None = None,
    quantize: bool = False,
    export: str | None = "onnx",
    min_epochs: int | None = None,
    image_size: int | None = None,
    project: str = DEFAULT_PROJECT,
) -> dict[str, Any]:
    """Retrain a project from seed + feedback + annotations; register the candidate as its
    challenger. Options left out take the project's task defaults (a classification project:
    smallcnn, 15 epochs, batch 128, lr 3e-3, light augmentation; a detection project: its
    default detector's recipe). ``quantize``: also make an INT8 variant (ONNX Runtime static
    quantization) and register it as the candidate, its fp32 source as its parent (classifiers
    only); a variant losing more than 0.5 points of hold-out accuracy is refused, and the fp32
    model is the candidate (the result and the report say so)."""
    pid = resolve_project(project)
    with db() as s:
        spec = core.retrain_spec(
            session=s,
            project_id=pid,
            architecture=architecture,
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            augment=augment,
            seed=seed,
            device=device,
            kfold=kfold,
            prune_ratio=prune_ratio,
            quantize=quantize or None,
            export=export,
            min_epochs=min_epochs,
            image_size=image_size,
        )
    snap = snapshot_task(pid)
    key, existing = existing_task(snap["snapshot_id"], spec, pid)
    result: dict[str, Any] = {
        "project": project,
        "snapshot": snap,
        "spec": asdict(spec),
        "key": key,
    }
    if existing is not None:
        print(f"snapshot {snap['snapshot_id']} with this spec was trained already: v{existing}")
        result.update(reused=True, candidate=judge_task(existing, pid))
    else:
        trained = train_task(snap["snapshot_id"], spec, pid)
        candidate_dir, parent_dir = trained["artifact_dir"], None
        if spec.prune_ratio:
            pruned = prune_task(candidate_dir, snap["snapshot_id"], spec, pid)
            result["prune"] = pruned["report"]
            candidate_dir, parent_dir = pruned["artifact_dir"], candidate_dir
        if spec.export:
            if parent_dir:
                export_task(parent_dir, snap["snapshot_id"], spec.export, pid)
            result["parity_max_abs_diff"] = export_task(
                candidate_dir, snap["snapshot_id"], spec.export, pid
            )
        if spec.quantize:  # the INT8 variant is the candidate; its fp32 source its parent
            int8 = quantize_task(candidate_dir, snap["snapshot_id"], pid)
            if "refused" in int8:  # the fp32 model stays the candidate; the report says why
                print(int8["refused"])
                result["quantize"] = int8
            else:
                result["quantize"] = int8["report"]
                parents = [parent_dir, candidate_dir] if parent_dir else candidate_dir
                candidate_dir, parent_dir = int8["artifact_dir"], parents
        result.update(
            reused=False,
            training=trained,
            candidate=register_task(key, candidate_dir, parent_dir, pid),
        )
    create_markdown_artifact(
        key="retrain-report",
        markdown=core.report_markdown(result),
        description="Retraining result and the policy's verdict on the candidate",
    )
    return result

"""`retrain`: snapshot -> train -> (prune) -> export -> register the challenger + comparison.

Every task calls one quarkflow_core.pipeline function; retries only where a retry is safe
(every step is; ``register`` is idempotent). Progress and the final report are Prefect
artifacts."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from prefect import flow, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    update_progress_artifact,
)

from flows.common import data_dir, db, storage
from quarkflow_core import pipeline as core
from quarkflow_core.config import get_settings


@task(name="snapshot", retries=2, retry_delay_seconds=2)
def snapshot_task() -> dict[str, Any]:
    from quarkflow_core.labels import build_training_snapshot

    with db() as s:
        _, _, report = build_training_snapshot(
            session=s, holdout_share=get_settings().holdout_share
        )
    return report


@task(name="find-existing")
def existing_task(snapshot_id: int, spec: core.RetrainSpec) -> tuple[str, int | None]:
    with db() as s:
        key = core.snapshot_key(session=s, snapshot_id=snapshot_id, spec=spec)
        row = core.existing_candidate(session=s, key=key)
        return key, row.version if row else None


@task(name="train", retries=2, retry_delay_seconds=1)
def train_task(snapshot_id: int, spec: core.RetrainSpec) -> dict[str, Any]:
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
        )
    update_progress_artifact(bar, progress=100.0)
    return out


@task(name="prune", retries=1)
def prune_task(artifact_dir: str, snapshot_id: int, spec: core.RetrainSpec) -> dict[str, Any]:
    with db() as s:
        return core.prune_step(
            session=s,
            storage=storage(),
            artifact_dir=artifact_dir,
            snapshot_id=snapshot_id,
            spec=spec,
        )


@task(name="export", retries=1)
def export_task(artifact_dir: str, snapshot_id: int, fmt: str) -> float:
    with db() as s:
        return core.export_step(
            session=s,
            storage=storage(),
            artifact_dir=artifact_dir,
            snapshot_id=snapshot_id,
            fmt=fmt,
        )


@task(name="register", retries=2, retry_delay_seconds=2)
def register_task(key: str, artifact_dir: str, parent_dir: str | None) -> dict[str, Any]:
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
            policy=PolicyConfig.from_settings(),
        )


@task(name="judge-existing")
def judge_task(version: int) -> dict[str, Any]:
    from quarkflow_core.registry import PolicyConfig, get_version, model_cache_dir

    with db() as s:
        return core.judge(
            session=s,
            storage=storage(),
            row=get_version(session=s, ref=version),
            cache_root=model_cache_dir(),
            policy=PolicyConfig.from_settings(),
        )


@flow(name="retrain", log_prints=True)
def retrain(
    architecture: str = "smallcnn",
    epochs: int = 15,
    batch_size: int = 128,
    lr: float = 3e-3,
    augment: str = "light",
    seed: int = 0,
    device: str = "auto",
    kfold: int = 0,
    prune_ratio: float | None = None,
    export: str | None = "onnx",
    min_epochs: int | None = None,
) -> dict[str, Any]:
    """Retrain from seed + feedback + annotations; register the candidate as challenger."""
    spec = core.RetrainSpec(
        architecture=architecture,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        augment=augment,
        seed=seed,
        device=device,
        kfold=kfold,
        prune_ratio=prune_ratio,
        export=export,
        min_epochs=min_epochs,
    )
    snap = snapshot_task()
    key, existing = existing_task(snap["snapshot_id"], spec)
    result: dict[str, Any] = {"snapshot": snap, "spec": asdict(spec), "key": key}
    if existing is not None:
        print(f"snapshot {snap['snapshot_id']} with this spec was trained already: v{existing}")
        result.update(reused=True, candidate=judge_task(existing))
    else:
        trained = train_task(snap["snapshot_id"], spec)
        candidate_dir, parent_dir = trained["artifact_dir"], None
        if prune_ratio:
            pruned = prune_task(candidate_dir, snap["snapshot_id"], spec)
            result["prune"] = pruned["report"]
            candidate_dir, parent_dir = pruned["artifact_dir"], candidate_dir
        if export:
            if parent_dir:
                export_task(parent_dir, snap["snapshot_id"], export)
            result["parity_max_abs_diff"] = export_task(candidate_dir, snap["snapshot_id"], export)
        result.update(
            reused=False,
            training=trained,
            candidate=register_task(key, candidate_dir, parent_dir),
        )
    create_markdown_artifact(
        key="retrain-report",
        markdown=core.report_markdown(result),
        description="Retraining result and the policy's verdict on the candidate",
    )
    return result

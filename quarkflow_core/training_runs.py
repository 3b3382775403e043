"""Training as a service: snapshot -> fit -> calibrate -> evaluate -> artifact, with a
``training_runs`` row that tells the workbench what happened (status, device, timings, metrics).

A run belongs to the project of its snapshot (``project_id``, default: the default project);
the default snapshot is the project's newest.

The CLI and the Prefect flows call these functions; nothing here knows about either."""

from __future__ import annotations

import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from quarkflow_core.datasets import get_snapshot
from quarkflow_core.errors import NotFound
from quarkflow_core.schema import (
    DEFAULT_PROJECT_ID,
    DatasetSnapshot,
    RunStatus,
    Split,
    TrainingRun,
    json_safe,
)
from quarkflow_core.storage import Storage


@dataclass
class TrainOutcome:
    run_id: int
    artifact_dir: Path
    manifest_sha256: str
    metrics: dict[str, Any]
    summary: dict[str, Any]


def default_snapshot_id(*, session: Session, project_id: int = DEFAULT_PROJECT_ID) -> int:
    """The project's newest snapshot (the seed one on a fresh install)."""
    snap_id = session.scalar(
        select(DatasetSnapshot.id)
        .where(DatasetSnapshot.project_id == project_id)
        .order_by(DatasetSnapshot.id.desc())
        .limit(1)
    )
    if snap_id is None:
        if project_id == DEFAULT_PROJECT_ID:
            raise NotFound("no dataset snapshot yet; run `quarkflow seed-demo` first")
        raise NotFound(f"project {project_id} has no dataset snapshot yet")
    return snap_id


def load_holdout(
    *,
    session: Session,
    storage: Storage,
    snapshot_id: int | None,
    preset: Any,
    project_id: int = DEFAULT_PROJECT_ID,
):
    """(snapshot id, hold-out ImageSet) of ``snapshot_id`` (default: the project's newest
    snapshot)."""
    from quarkflow_core.ml.data import load_snapshot

    snap_id = snapshot_id or default_snapshot_id(session=session, project_id=project_id)
    data = load_snapshot(
        session=session,
        storage=storage,
        snapshot_id=snap_id,
        preset=preset,
        splits=(Split.HOLDOUT,),
        project_id=project_id,
    )
    if Split.HOLDOUT not in data:
        raise NotFound(f"snapshot {snap_id} has no hold-out split")
    return snap_id, data[Split.HOLDOUT]


def headline(metrics: dict[str, Any]) -> dict[str, Any]:
    """The few numbers people scan first."""
    hold = metrics.get("holdout", {})
    out = {k: hold.get(k) for k in ("accuracy", "macro_f1", "ece", "top3_accuracy")}
    out["ece_uncalibrated"] = hold.get("ece_uncalibrated")
    out["temperature"] = metrics.get("temperature")
    out["review_threshold"] = metrics.get("review_threshold", {}).get("threshold")
    if "kfold" in metrics:
        acc = metrics["kfold"]["accuracy"]
        out["kfold_accuracy"] = f"{acc['mean']:.4f} ± {acc['std']:.4f}"
    lat = hold.get("latency", {}).get("batch1", {})
    out["latency_ms_batch1"] = lat.get("median_ms")
    return out


def train_from_snapshot(
    *,
    session: Session,
    storage: Storage,
    snapshot_id: int,
    config: Any,
    out_dir: str | Path,
    kfold: int = 0,
    review_target_accuracy: float = 0.99,
    progress: Any = None,
    kfold_progress: Any = None,
    project_id: int = DEFAULT_PROJECT_ID,
) -> TrainOutcome:
    """Train on the snapshot's train split, calibrate on the validation carve-out, evaluate on
    its fixed hold-out, and write a verified artifact. Commits the run row (in the project)
    at each stage; the snapshot must be the project's."""
    import torch

    from quarkflow_core.ml.artifacts import save_artifact
    from quarkflow_core.ml.calibration import fit_temperature, threshold_for_accuracy
    from quarkflow_core.ml.data import load_snapshot
    from quarkflow_core.ml.engine import predict_logits, select_device
    from quarkflow_core.ml.evaluate import cross_validate, evaluate_model
    from quarkflow_core.ml.train import fit

    config.validate()
    snap = get_snapshot(session=session, snapshot_id=snapshot_id, project_id=project_id)
    with recorded_run(
        session=session,
        project_id=project_id,
        config=config.to_dict(),
        snapshot_id=snap.id,
        device=str(select_device(config.device)),
    ) as run:
        preset = config.eval_preset()
        data = load_snapshot(
            session=session,
            storage=storage,
            snapshot_id=snap.id,
            preset=preset,
            project_id=project_id,
        )
        if Split.TRAIN not in data or Split.HOLDOUT not in data:
            raise NotFound(f"snapshot {snap.id} needs both a train and a holdout split")
        # End the read transaction before minutes of training: on SQLite a transaction that
        # read, then writes after another process wrote (the API logging predictions), is
        # refused with "database is locked" instead of waiting.
        session.commit()
        on_progress = live_progress(
            session,
            run,
            progress=progress,
            entry=lambda ev: {
                "epoch": ev.epoch,
                "train_loss": ev.train_loss,
                "val_loss": ev.val_loss,
                "val_accuracy": ev.val_accuracy,
            },
        )
        result = fit(data[Split.TRAIN], config, progress=on_progress)
        val_logits = predict_logits(result.model, result.val.images, result.preset)
        temperature = fit_temperature(val_logits, result.val.labels)
        val_probs = torch.softmax(val_logits / temperature, 1)
        threshold = threshold_for_accuracy(
            val_probs, result.val.labels, target=review_target_accuracy
        )
        holdout = data[Split.HOLDOUT]
        metrics: dict[str, Any] = {
            "holdout": evaluate_model(
                result.model, holdout, result.preset, temperature=temperature
            ),
            "validation": {
                "accuracy": float(val_probs.argmax(1).eq(result.val.labels).float().mean()),
                "n": len(result.val),
            },
            "temperature": temperature,
            "review_threshold": threshold,
            "training": result.summary(),
        }
        if kfold:
            metrics["kfold"] = cross_validate(
                data[Split.TRAIN], config, k=kfold, progress=kfold_progress
            )
        sha = save_artifact(
            out_dir,
            model=result.model,
            architecture=config.architecture,
            classes=result.classes,
            in_channels=result.in_channels,
            preset=result.preset,
            temperature=temperature,
            metrics=metrics,
            training={
                "config": config.to_dict(),
                "history": result.history,
                "device": result.device,
                "run_id": run.id,
            },
            dataset=dataset_record(snap),
        )
        finish_run(session, run, headline=headline(metrics), history=result.history)
        return TrainOutcome(run.id, Path(out_dir), sha, metrics, result.summary())


def dataset_record(snap: DatasetSnapshot) -> dict[str, Any]:
    """What an artifact's manifest says about the snapshot it was trained on."""
    return {
        "snapshot_id": snap.id,
        "content_hash": snap.content_hash,
        "class_counts": snap.class_counts,
    }


def live_progress(
    session: Session,
    run: TrainingRun,
    *,
    progress: Any,
    entry: Callable[[Any], dict[str, Any]],
) -> Callable[[Any], None]:
    """A fit's progress callback that also commits each epoch's ``entry`` to the run row, so
    the workbench shows live progress, then passes the event on to ``progress``."""
    live: list[dict[str, Any]] = []

    def on_progress(ev: Any) -> None:
        if ev.stage == "epoch":
            live.append(entry(ev))
            run.progress = json_safe({"history": live, "epoch": ev.epoch, "epochs": ev.epochs})
            session.commit()
        if progress is not None:
            progress(ev)

    return on_progress


def finish_run(
    session: Session, run: TrainingRun, *, headline: dict[str, Any], history: list[Any]
) -> None:
    """Mark a run succeeded with its headline metrics and full history; commits."""
    run.status = RunStatus.SUCCEEDED
    run.metrics = json_safe(headline)
    run.progress = json_safe({"history": history})
    run.finished_at = datetime.now(UTC)
    session.commit()


@contextmanager
def recorded_run(
    *, session: Session, project_id: int, config: dict[str, Any], snapshot_id: int, device: str
) -> Iterator[TrainingRun]:
    """A ``training_runs`` row, committed as running before the block and as failed (with the
    error) when the block raises; the block marks success itself."""
    run = TrainingRun(
        project_id=project_id,
        status=RunStatus.RUNNING,
        config=config,
        snapshot_id=snapshot_id,
        device=device,
        started_at=datetime.now(UTC),
    )
    session.add(run)
    session.commit()
    try:
        yield run
    except BaseException as exc:
        session.rollback()
        run.status = RunStatus.FAILED
        run.error = "".join(traceback.format_exception_only(exc)).strip()[:4000]
        run.finished_at = datetime.now(UTC)
        session.commit()
        raise

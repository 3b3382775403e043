"""Training a detector as a service: snapshot -> fit -> threshold on validation -> evaluate on
the fixed hold-out -> verified artifact, with a ``training_runs`` row the workbench follows
live (the detection counterpart of ``training_runs.train_from_snapshot``)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from quarkflow_core.datasets import get_snapshot
from quarkflow_core.errors import NotFound
from quarkflow_core.schema import DEFAULT_PROJECT_ID, Split
from quarkflow_core.storage import Storage

FALLBACK_THRESHOLD = 0.5
EVAL_FLOOR = 0.01  # mAP needs the low-confidence tail that serving's floor (0.05) cuts off
HEADLINE = ("map", "map_50", "map_75", "map_small", "map_medium", "map_large", "mar_100")


@dataclass
class DetectorOutcome:
    run_id: int
    artifact_dir: Path
    manifest_sha256: str
    metrics: dict[str, Any]
    summary: dict[str, Any]

    @property
    def headline(self) -> dict[str, Any]:
        return detection_headline(self.metrics)


def detection_headline(metrics: dict[str, Any]) -> dict[str, Any]:
    """The few numbers people scan first for a detector (``ModelVersion.metrics``)."""
    hold = metrics.get("holdout", {})
    out: dict[str, Any] = {k: hold.get(k) for k in HEADLINE}
    at = hold.get("at_threshold") or {}
    out.update(
        {
            "precision": at.get("precision"),
            "recall": at.get("recall"),
            "f1": at.get("f1"),
            "score_threshold": metrics.get("score_threshold"),
            "latency_ms_batch1": metrics.get("latency_ms_batch1"),
            "task": "detection",
        }
    )
    return out


def evaluate_on(model: Any, data: Any, *, score_threshold: float | None = None) -> dict[str, Any]:
    """mAP family, per class, per size, PR curves of ``model`` on ``data``."""
    from quarkflow_core.detection.metrics import evaluate_detections
    from quarkflow_core.detection.train import detect

    preds = detect(model, data.images, score_floor=EVAL_FLOOR)
    truths = [{"boxes": b, "labels": lab} for b, lab in zip(data.boxes, data.labels, strict=True)]
    return evaluate_detections(preds, truths, data.classes, score_threshold=score_threshold)


def latency_ms(model: Any, image: Any, repeats: int = 5) -> float:
    """Median single-image inference time (ms) on the CPU."""
    from quarkflow_core.detection.train import detect
    from quarkflow_core.ml.engine import median_latency_ms

    return round(median_latency_ms(lambda x: detect(model, [x]), image, repeats=repeats), 2)


def train_detector_from_snapshot(
    *,
    session: Session,
    storage: Storage,
    snapshot_id: int,
    config: Any,
    out_dir: str | Path,
    progress: Any = None,
    project_id: int = DEFAULT_PROJECT_ID,
) -> DetectorOutcome:
    """Train on the snapshot's train split, choose the score threshold on the validation
    carve-out (best F1 at IoU 0.5), evaluate on its fixed hold-out and write a verified
    artifact. Commits the run row at each stage; the snapshot must be the project's."""
    from quarkflow_core.detection.artifacts import save_detector_artifact
    from quarkflow_core.detection.metrics import choose_threshold
    from quarkflow_core.detection.snapshots import load_detection_snapshot
    from quarkflow_core.detection.train import detect, fit_detector
    from quarkflow_core.ml.engine import select_device
    from quarkflow_core.training_runs import (
        dataset_record,
        finish_run,
        live_progress,
        recorded_run,
    )

    config.validate()
    snap = get_snapshot(session=session, snapshot_id=snapshot_id, project_id=project_id)
    with recorded_run(
        session=session,
        project_id=project_id,
        config={**config.to_dict(), "task": "detection"},
        snapshot_id=snap.id,
        device=str(select_device(config.device)),
    ) as run:
        data = load_detection_snapshot(
            session=session, storage=storage, snapshot_id=snap.id, project_id=project_id
        )
        if Split.TRAIN not in data or Split.HOLDOUT not in data:
            raise NotFound(f"snapshot {snap.id} needs both a train and a holdout split")
        session.commit()  # no read transaction held through minutes of training (SQLite)
        on_progress = live_progress(
            session,
            run,
            progress=progress,
            entry=lambda ev: {
                "epoch": ev.epoch,
                "train_loss": ev.train_loss,
                "val_loss": ev.val_loss,
                "val_map50": ev.val_map,
            },
        )
        result = fit_detector(data[Split.TRAIN], config, progress=on_progress)
        val = result.val
        val_preds = detect(result.model, val.images, score_floor=EVAL_FLOOR)
        val_truths = [
            {"boxes": b, "labels": lab} for b, lab in zip(val.boxes, val.labels, strict=True)
        ]
        chosen = choose_threshold(val_preds, val_truths)
        # no box found on validation (an undertrained detector): a middle threshold, said so
        best = chosen["threshold"]
        threshold = FALLBACK_THRESHOLD if best is None else float(best)
        chosen["source"] = "fallback" if best is None else "best_f1_on_validation"
        holdout = data[Split.HOLDOUT]
        metrics: dict[str, Any] = {
            "task": "detection",
            "holdout": evaluate_on(result.model, holdout, score_threshold=threshold),
            "validation": {**chosen, "n": len(val)},
            "score_threshold": threshold,
            "latency_ms_batch1": latency_ms(result.model, holdout.images[0]),
            "training": result.summary(),
        }
        sha = save_detector_artifact(
            out_dir,
            model=result.model,
            architecture=config.architecture,
            classes=list(holdout.classes),
            config=result.config.to_dict(),
            score_threshold=threshold,
            metrics=metrics,
            training={
                "config": result.config.to_dict(),
                "history": result.history,
                "device": result.device,
                "run_id": run.id,
            },
            dataset=dataset_record(snap),
        )
        finish_run(session, run, headline=detection_headline(metrics), history=result.history)
        return DetectorOutcome(run.id, Path(out_dir), sha, metrics, result.summary())


def export_detector_step(
    *,
    session: Session,
    storage: Storage,
    artifact_dir: str,
    snapshot_id: int,
    fmt: str,
    project_id: int = DEFAULT_PROJECT_ID,
) -> float:
    """ONNX export of an unregistered detector artifact, parity checked on hold-out images;
    returns the largest difference (a retried step returns the recorded one)."""
    from quarkflow_core.detection.artifacts import load_detector_artifact
    from quarkflow_core.detection.export import export_detector_onnx
    from quarkflow_core.detection.snapshots import load_detection_snapshot
    from quarkflow_core.errors import InvalidInput

    if fmt != "onnx":
        raise InvalidInput(f"detectors export to onnx only, not {fmt!r}")
    manifest = json.loads((Path(artifact_dir) / "manifest.json").read_text())
    if (Path(artifact_dir) / "model.onnx").exists():
        return float(manifest["exports"]["onnx"]["parity_max_abs_diff"])
    holdout = load_detection_snapshot(
        session=session,
        storage=storage,
        snapshot_id=snapshot_id,
        splits=(Split.HOLDOUT,),
        project_id=project_id,
    )[Split.HOLDOUT]
    loaded = load_detector_artifact(artifact_dir)
    report = export_detector_onnx(loaded, artifact_dir, sample_images=holdout.images[:8])
    return float(report["parity_max_abs_diff"])

"""Training and model files: `train`, `models-zoo`, `evaluate`, `compare`, `prune`,
`quantize`, `export`, `retrain`.

Top-level commands are registered (in `quarkflow --help` order) by app/cli/__init__.py. They
work in the `quarkflow --project NAME` project (default: `default`): its snapshots, its runs."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import typer
from rich.table import Table
from sqlalchemy.orm import Session

from app.cli.common import (
    _fmt,
    _print_kv,
    _progress,
    _session,
    _settings,
    console,
    project_id,
    project_name,
)


def _holdout(session: Session, snapshot: int | None, preset):
    from quarkflow_core.storage import get_storage
    from quarkflow_core.training_runs import load_holdout

    return load_holdout(
        session=session,
        storage=get_storage(),
        snapshot_id=snapshot,
        preset=preset,
        project_id=project_id(session),
    )


def _fit_progress(bar, title: str, epochs: int, validation: Callable[[Any], str]):
    """A fit's progress callback drawing ``bar``: per batch the loss, per epoch a line with
    the training loss and ``validation(event)``."""
    task = bar.add_task(title, total=epochs)

    def on_progress(ev) -> None:
        if ev.stage == "batch":
            bar.update(
                task,
                completed=ev.epoch - 1 + ev.step / max(ev.steps, 1),
                description=f"epoch {ev.epoch}/{ev.epochs} loss {ev.train_loss:.3f}",
            )
        elif ev.stage == "epoch":
            bar.update(task, completed=ev.epoch)
            shown = validation(ev)
            bar.console.print(
                f"epoch {ev.epoch:>2}: train loss {ev.train_loss:.4f}"
                + (f"  {shown}" if shown else "")
            )
        elif ev.stage == "done":
            bar.update(task, completed=epochs, description=f"trained ({ev.message})")

    return on_progress


def train(
    architecture: str = typer.Option("smallcnn", "--arch", help="See `quarkflow models-zoo`."),
    epochs: int = typer.Option(15, help="Maximum epochs (early stopping may end sooner)."),
    batch_size: int = typer.Option(128),
    lr: float = typer.Option(3e-3, help="Peak learning rate (one-cycle schedule)."),
    augment: str = typer.Option("light", help="none | light | photo"),
    preset: str | None = typer.Option(None, help="Eval preset; default: the architecture's."),
    image_size: int | None = typer.Option(None, help="Override the preset's image size."),
    class_weights: bool = typer.Option(False, help="Inverse-frequency class weights."),
    pretrained: str | None = typer.Option(
        None,
        help="Local weights file ('package' for efficientnet_lite0's shipped ImageNet weights).",
    ),
    seed: int = typer.Option(0),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    snapshot: int | None = typer.Option(None, help="Dataset snapshot id (default: newest)."),
    kfold: int = typer.Option(0, help="Also run stratified k-fold CV on the train split."),
    out: Path | None = typer.Option(None, help="Artifact folder (default under QF_DATA_DIR)."),
) -> None:
    """Train a model on a dataset snapshot, calibrate it, evaluate it, write an artifact."""
    from quarkflow_core.ml.train import TrainConfig
    from quarkflow_core.storage import get_storage
    from quarkflow_core.training_runs import default_snapshot_id, headline, train_from_snapshot

    config = TrainConfig(
        architecture=architecture,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        augment=augment,
        preset=preset,
        image_size=image_size,
        class_weights=class_weights,
        pretrained_weights=pretrained,
        seed=seed,
        device=device,
    )
    config.validate()
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    out = out or _settings().data_dir / "artifacts" / f"{stamp}-{architecture}"
    with _session() as session, _progress() as bar:
        pid = project_id(session)
        snap_id = snapshot or default_snapshot_id(session=session, project_id=pid)
        on_progress = _fit_progress(
            bar,
            f"training {architecture}",
            epochs,
            lambda ev: f"val loss {ev.val_loss:.4f}  val acc {ev.val_accuracy:.4f}",
        )

        def on_fold(i: int, k: int, fold: dict) -> None:
            bar.console.print(f"fold {i}/{k}: accuracy {fold['accuracy']:.4f}")

        outcome = train_from_snapshot(
            session=session,
            storage=get_storage(),
            snapshot_id=snap_id,
            config=config,
            out_dir=out,
            kfold=kfold,
            progress=on_progress,
            kfold_progress=on_fold,
            project_id=pid,
        )
    _print_kv(
        f"training run #{outcome.run_id} (snapshot {snap_id})",
        {
            **headline(outcome.metrics),
            "device": outcome.summary["device"],
            "epochs_run": outcome.summary["epochs_run"],
            "train_seconds": outcome.summary["train_seconds"],
            "images_per_second": outcome.summary["images_per_second"],
        },
    )
    console.print(
        f"artifact: {outcome.artifact_dir}  (manifest sha256 {outcome.manifest_sha256[:12]}…)"
    )


def train_detector(
    architecture: str | None = typer.Option(
        None, "--arch", help="See `quarkflow models-zoo` (default: the CPU-friendly detector)."
    ),
    epochs: int | None = typer.Option(None, help="Maximum epochs (default: the detector's)."),
    batch_size: int | None = typer.Option(None, help="Default: the detector's."),
    lr: float | None = typer.Option(None, help="Peak learning rate (default: the detector's)."),
    augment: str = typer.Option("none", help="none | flip (natural objects; not digits)"),
    image_size: int | None = typer.Option(None, help="Side images are resized to."),
    seed: int = typer.Option(0),
    device: str = typer.Option("auto", help="auto | cpu | cuda (AMP on CUDA)"),
    snapshot: int | None = typer.Option(None, help="Dataset snapshot id (default: newest)."),
    out: Path | None = typer.Option(None, help="Artifact folder (default under QF_DATA_DIR)."),
) -> None:
    """Train a detector on a detection project's snapshot: threshold chosen on validation,
    mAP on the fixed hold-out, a verified artifact."""
    from quarkflow_core.detection.train import DEFAULT_DETECTOR, DetectorConfig
    from quarkflow_core.detection.training import train_detector_from_snapshot
    from quarkflow_core.errors import InvalidInput
    from quarkflow_core.projects import is_detection
    from quarkflow_core.storage import get_storage
    from quarkflow_core.training_runs import default_snapshot_id

    config = DetectorConfig(
        architecture=architecture or DEFAULT_DETECTOR,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        augment=augment,
        image_size=image_size,
        seed=seed,
        device=device,
    )
    config.validate()
    total = config.resolved().epochs
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    out = out or _settings().data_dir / "artifacts" / f"{stamp}-{config.architecture}"
    with _session() as session, _progress() as bar:
        pid = project_id(session)
        if not is_detection(session=session, project_id=pid):
            raise InvalidInput(
                f"project {project_name()!r} is not a detection project; use `quarkflow train`"
            )
        snap_id = snapshot or default_snapshot_id(session=session, project_id=pid)
        on_progress = _fit_progress(
            bar,
            f"training {config.architecture}",
            total,
            lambda ev: "" if ev.val_map is None else f"val mAP@0.5 {ev.val_map:.4f}",
        )

        outcome = train_detector_from_snapshot(
            session=session,
            storage=get_storage(),
            snapshot_id=snap_id,
            config=config,
            out_dir=out,
            progress=on_progress,
            project_id=pid,
        )
    _print_kv(
        f"training run #{outcome.run_id} (snapshot {snap_id})",
        {
            **{k: v for k, v in outcome.headline.items() if k != "task"},
            "device": outcome.summary.get("device"),
            "epochs_run": outcome.summary.get("epochs_run"),
            "train_seconds": outcome.summary.get("train_seconds"),
            "images_per_second": outcome.summary.get("images_per_second"),
        },
    )
    console.print(
        f"artifact: {outcome.artifact_dir}  (manifest sha256 {outcome.manifest_sha256[:12]}…)"
    )


def models_zoo() -> None:
    """List the architectures `train --arch` accepts."""
    from quarkflow_core.detection.models import detector_spec, list_detectors
    from quarkflow_core.ml.models import list_models, model_spec

    table = Table("name", "task", "default preset", "description")
    for name in list_models():
        spec = model_spec(name)
        table.add_row(name, "classification", spec.default_preset, spec.description)
    for name in list_detectors():
        det = detector_spec(name)
        table.add_row(name, "detection", f"{det.image_size} px", det.description)
    console.print(table)


def evaluate(
    artifact: Path = typer.Argument(..., help="Artifact folder."),
    snapshot: int | None = typer.Option(None, help="Snapshot whose hold-out to use."),
    json_out: Path | None = typer.Option(None, "--json", help="Write the full report here."),
) -> None:
    """Evaluate an artifact on a snapshot's hold-out: accuracy, F1, ECE, top-k, latency."""
    import json

    from quarkflow_core.ml.artifacts import load_artifact
    from quarkflow_core.ml.evaluate import evaluate_model
    from quarkflow_core.ml.quantize import evaluate_int8, requires_onnxruntime

    loaded = load_artifact(artifact)
    with _session() as session:
        snap_id, holdout = _holdout(session, snapshot, loaded.preset)
    if requires_onnxruntime(loaded.manifest):  # an INT8 variant: its INT8 graph, not weights.pt
        report = evaluate_int8(loaded, holdout)
    else:
        report = evaluate_model(
            loaded.model, holdout, loaded.preset, temperature=loaded.temperature
        )
    _print_kv(
        f"{loaded.architecture} on hold-out of snapshot {snap_id} (n={report['n']})",
        {
            "accuracy": report["accuracy"],
            "macro_f1": report["macro_f1"],
            "ece": report["ece"],
            "top3_accuracy": report.get("top3_accuracy"),
            "latency_ms_batch1": report["latency"]["batch1"]["median_ms"],
            "latency_ms_per_image_batch32": report["latency"]["batch32"]["per_image_ms"],
        },
    )
    per = Table("class", "precision", "recall", "f1", "support", title="per class")
    for c, m in report["per_class"].items():
        per.add_row(c, _fmt(m["precision"]), _fmt(m["recall"]), _fmt(m["f1"]), str(m["support"]))
    console.print(per)
    if json_out:
        json_out.write_text(json.dumps(report, indent=2))
        console.print(f"report written to {json_out}")


def compare_cmd(
    a: Path = typer.Argument(..., help="Reference artifact (e.g. the champion)."),
    b: Path = typer.Argument(..., help="Candidate artifact."),
    snapshot: int | None = typer.Option(None, help="Snapshot whose hold-out to use."),
    json_out: Path | None = typer.Option(None, "--json", help="Write the full report here."),
) -> None:
    """Paired comparison on the same hold-out: McNemar, bootstrap CI, per-class deltas."""
    import json

    from quarkflow_core.ml.artifacts import load_artifact
    from quarkflow_core.ml.compare import compare
    from quarkflow_core.ml.quantize import requires_onnxruntime, served_latency_ms, served_proba

    la, lb = load_artifact(a), load_artifact(b)
    if la.classes != lb.classes:
        raise typer.BadParameter("the two artifacts have different class lists")
    with _session() as session:
        snap_id, hold_a = _holdout(session, snapshot, la.preset)
        hold_b = hold_a if lb.preset == la.preset else _holdout(session, snap_id, lb.preset)[1]
    if hold_a.ids != hold_b.ids:
        raise typer.BadParameter("hold-out items differ between the two presets")

    # an INT8 variant is scored and timed on its INT8 graph; then both sides on ONNX Runtime
    onnx = requires_onnxruntime(la.manifest) or requires_onnxruntime(lb.manifest)

    def meta(m):
        return {
            "size_bytes": sum(f["size"] for f in m.manifest["files"].values()),
            "latency_ms": served_latency_ms(m, onnx=onnx),
        }

    report = compare(
        hold_a.labels,
        served_proba(la, hold_a.images),
        served_proba(lb, hold_b.images),
        la.classes,
        meta_a=meta(la),
        meta_b=meta(lb),
    )
    lo, hi = report["accuracy_delta_ci95"]
    _print_kv(
        f"B vs A on hold-out of snapshot {snap_id} (n={report['n']})",
        {
            "accuracy A": report["accuracy_a"],
            "accuracy B": report["accuracy_b"],
            "delta (B-A)": report["accuracy_delta"],
            "95% CI": f"[{lo:+.4f}, {hi:+.4f}]",
            "McNemar p": report["mcnemar"]["p_value"],
            "ECE delta": report["ece_delta"],
            **{f"{k} delta": v for k, v in report["deltas"].items()},
            "verdict": report["verdict"],
        },
    )
    if json_out:
        json_out.write_text(json.dumps(report, indent=2))


def prune_cmd(
    artifact: Path = typer.Argument(..., help="Artifact folder to prune."),
    ratio: float = typer.Option(0.5, help="Share of channels (structured) or weights removed."),
    method: str = typer.Option("structured", help="structured | unstructured"),
    recover_epochs: int = typer.Option(2, help="Fine-tune epochs after structured pruning."),
    snapshot: int | None = typer.Option(None),
    out: Path = typer.Option(..., help="Folder for the pruned artifact."),
) -> None:
    """Prune a model, recover accuracy, report the trade-off, write a new artifact."""
    from quarkflow_core.ml.artifacts import load_artifact
    from quarkflow_core.ml.data import load_snapshot
    from quarkflow_core.ml.variants import prune_artifact
    from quarkflow_core.schema import Split
    from quarkflow_core.storage import get_storage
    from quarkflow_core.training_runs import default_snapshot_id

    loaded = load_artifact(artifact)
    with _session() as session:
        pid = project_id(session)
        snap_id = snapshot or default_snapshot_id(session=session, project_id=pid)
        data = load_snapshot(
            session=session,
            storage=get_storage(),
            snapshot_id=snap_id,
            preset=loaded.preset,
            project_id=pid,
        )
    with console.status(f"pruning {ratio:.0%} ({method}) and recovering…"):
        report, sha = prune_artifact(
            loaded,
            train=data[Split.TRAIN],
            holdout=data[Split.HOLDOUT],
            ratio=ratio,
            method=method,
            recover_epochs=recover_epochs,
            out_dir=out,
        )
    _print_kv(f"{method} pruning {ratio:.0%}", report)
    console.print(f"pruned artifact: {out}  (manifest sha256 {sha[:12]}…)")


def quantize_cmd(
    artifact: Path = typer.Argument(..., help="Classifier artifact folder to quantize."),
    out: Path = typer.Option(..., help="Folder for the INT8 artifact."),
    max_loss: float = typer.Option(
        0.5, help="Refuse when hold-out accuracy drops by more than this many points."
    ),
    snapshot: int | None = typer.Option(
        None, help="Snapshot: calibration on its train split, evidence on its hold-out."
    ),
) -> None:
    """INT8 variant (ONNX Runtime static quantization, QDQ, calibrated on training images):
    accuracy, agreement, size and latency against fp32 on the hold-out; a new artifact."""
    from quarkflow_core.pipeline import quantize_step
    from quarkflow_core.storage import get_storage
    from quarkflow_core.training_runs import default_snapshot_id

    with _session() as session:
        pid = project_id(session)
        with console.status("quantizing to INT8 and measuring against fp32…"):
            result = quantize_step(
                session=session,
                storage=get_storage(),
                artifact_dir=str(artifact),
                snapshot_id=snapshot or default_snapshot_id(session=session, project_id=pid),
                out_dir=out,
                max_loss_points=max_loss,
                project_id=pid,
            )
    report = result["report"]
    _print_kv(
        "INT8 (ONNX Runtime, QDQ) against fp32 on the hold-out",
        {
            "accuracy fp32": report["accuracy_fp32"],
            "accuracy INT8": report["accuracy_int8"],
            "loss (points)": report["accuracy_loss_points"],
            "top-1 agreement": report["agreement"],
            "max |Δ prob|": report["max_abs_prob_diff"],
            "bytes fp32 / INT8": f"{report['bytes_fp32']:,} / {report['bytes_int8']:,}",
            "size ratio": report["size_ratio"],
            f"batch-1 ms fp32 / INT8 ({report['threads']} threads)": (
                f"{report['latency_ms_b1_fp32']:.3f} / {report['latency_ms_b1_int8']:.3f}"
            ),
            "batch-32 img/s fp32 / INT8": (
                f"{report['images_per_s_b32_fp32']:.0f} / {report['images_per_s_b32_int8']:.0f}"
            ),
        },
    )
    console.print(f"INT8 artifact: {out}  (manifest sha256 {result['sha256'][:12]}…)")


def export_cmd(
    artifact: Path = typer.Argument(..., help="Artifact folder (not yet registered)."),
    fmt: str = typer.Option("onnx", "--format", help="onnx | torchscript | all"),
    snapshot: int | None = typer.Option(None, help="Snapshot whose images check parity."),
) -> None:
    """Export to ONNX / TorchScript inside the artifact, with a parity check on real images
    (a detector: ONNX, checked on hold-out images of the project's snapshot)."""
    import json

    from quarkflow_core.ml.artifacts import load_artifact
    from quarkflow_core.ml.variants import export_artifact

    if json.loads((artifact / "manifest.json").read_text()).get("task") == "detection":
        from quarkflow_core.detection.training import export_detector_step
        from quarkflow_core.storage import get_storage
        from quarkflow_core.training_runs import default_snapshot_id

        with _session() as session:
            pid = project_id(session)
            diff = export_detector_step(
                session=session,
                storage=get_storage(),
                artifact_dir=str(artifact),
                snapshot_id=snapshot or default_snapshot_id(session=session, project_id=pid),
                fmt="onnx" if fmt == "all" else fmt,
                project_id=pid,
            )
        console.print(f"onnx: parity ok (max |Δ| = {diff:.2e} on hold-out images)")
        return
    loaded = load_artifact(artifact)
    with _session() as session:
        _, holdout = _holdout(session, snapshot, loaded.preset)
    formats = ["onnx", "torchscript"] if fmt == "all" else [fmt]
    for f in formats:
        diff = export_artifact(loaded, fmt=f, images=holdout.images[:64])
        console.print(f"{f}: parity ok (max |Δp| = {diff:.2e} on 64 hold-out images)")


def retrain_cmd(
    epochs: int | None = typer.Option(
        None, help="Maximum epochs (early stopping may end sooner); default 15, or the detector's."
    ),
    min_epochs: int | None = typer.Option(
        None, help="No early stop before this epoch (default: 80% of --epochs)."
    ),
    architecture: str | None = typer.Option(
        None, "--arch", help="See `quarkflow models-zoo`; default smallcnn, or the detector's."
    ),
    batch_size: int | None = typer.Option(None, help="Default 128, or the detector's."),
    lr: float | None = typer.Option(
        None, help="Peak learning rate (one-cycle schedule); default 3e-3, or the detector's."
    ),
    augment: str | None = typer.Option(
        None, help="none | light | photo (classification; default light), none | flip (detection)"
    ),
    seed: int = typer.Option(0),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    kfold: int = typer.Option(0, help="Also run stratified k-fold CV on the train split."),
    prune_ratio: float | None = typer.Option(None, help="Also prune the candidate."),
    quantize: bool = typer.Option(
        False,
        "--quantize",
        help="Also make an INT8 variant and register it as the candidate (classifiers).",
    ),
    deployment: bool = typer.Option(
        False, help="Start the `retrain` deployment on the worker instead of running here."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the result as one JSON object."),
) -> None:
    """Run the retrain flow now (or trigger its deployment): snapshot, train, register."""
    import json

    from quarkflow_core.pipeline import is_detection_spec, retrain_spec

    params = {
        "epochs": epochs,
        "min_epochs": min_epochs,
        "architecture": architecture,
        "batch_size": batch_size,
        "lr": lr,
        "augment": augment,
        "seed": seed,
        "device": device,
        "kfold": kfold,
        "prune_ratio": prune_ratio,
        "quantize": quantize or None,
    }
    with _session() as session:  # a bad option fails here, not on the worker
        spec = retrain_spec(session=session, project_id=project_id(session), **params)
    (spec.detector_config() if is_detection_spec(spec) else spec.train_config()).validate()
    params = {k: v for k, v in params.items() if v is not None}  # the flow fills the defaults
    params["project"] = project_name()  # the flow resolves it (NotFound names the projects)
    if deployment:
        from quarkflow_core.orchestration import start_retrain
        from quarkflow_core.users import Operator

        with _session() as session:
            run_id = start_retrain(
                session=session,
                actor=Operator.current(),
                api_url=_settings().prefect_api_url,
                parameters=params,
                project_id=project_id(session),  # an unknown project fails here
            )
        if as_json:
            print(json.dumps({"flow_run_id": run_id, "parameters": params}))
        else:
            console.print(f"started retrain flow run {run_id} on the worker")
        return
    from flows.retrain import retrain

    result = retrain(**params)
    if as_json:
        print(json.dumps(result, default=str))
        return
    cand = result["candidate"]
    console.print(
        f"candidate v{cand['version']} registered as challenger; policy: "
        f"{cand['policy']['verdict']} ({'; '.join(cand['policy']['reasons'])})"
    )

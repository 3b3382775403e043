"""The retraining pipeline's steps, each a plain function the ``retrain`` flow wraps in a task:
snapshot -> train (+ calibrate, hold-out and k-fold evaluation) -> optional prune + recover
-> export -> optional INT8 quantization -> register as challenger with its comparison against
the champion.

Idempotent: a run is identified by a key over the snapshot's content hash and the training
spec; when a version with that key is registered already, the flow returns it instead of
training again. Each step writes into a fresh folder and only ``register`` touches the
registry (atomically), so a crash at any step leaves no half-registered version.

Every step works in one project (``project_id``, default: the default project): its snapshot,
its training run, its versions, its champion and challenger."""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from quarkflow_core.datasets import get_snapshot
from quarkflow_core.errors import InvalidInput
from quarkflow_core.schema import DEFAULT_PROJECT, DEFAULT_PROJECT_ID, ModelVersion, Split
from quarkflow_core.storage import Storage


@dataclass(frozen=True)
class RetrainSpec:
    architecture: str = "smallcnn"
    epochs: int = 15
    batch_size: int = 128
    lr: float = 3e-3
    augment: str = "light"
    seed: int = 0
    device: str = "auto"
    kfold: int = 0
    prune_ratio: float | None = None
    recover_epochs: int = 2
    export: str | None = "onnx"
    min_epochs: int | None = None  # early stopping not before (default: 80% of epochs)
    image_size: int | None = None  # None: the architecture's (preset's, detector's) own
    quantize: bool = False  # also an INT8 variant (ONNX Runtime, QDQ), registered as candidate

    def train_config(self):
        from quarkflow_core.ml.train import TrainConfig

        return TrainConfig(
            architecture=self.architecture,
            epochs=self.epochs,
            batch_size=self.batch_size,
            lr=self.lr,
            augment=self.augment,
            seed=self.seed,
            device=self.device,
            min_epochs=self.min_epochs,
            image_size=self.image_size,
        )

    def detector_config(self):
        from quarkflow_core.detection.train import DetectorConfig

        return DetectorConfig(
            architecture=self.architecture,
            epochs=self.epochs,
            batch_size=self.batch_size,
            lr=self.lr,
            augment=self.augment,
            seed=self.seed,
            device=self.device,
            min_epochs=self.min_epochs,
            image_size=self.image_size,
        )

    def key(self, snapshot_hash: str) -> str:
        spec = asdict(self)
        for option in ("min_epochs", "image_size", "quantize"):  # keys of runs from before
            if spec[option] in (None, False):  # the options stay the same
                del spec[option]
        text = json.dumps({"snapshot": snapshot_hash, "spec": spec}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()


def retrain_spec(
    *, session: Session, project_id: int = DEFAULT_PROJECT_ID, **given: Any
) -> RetrainSpec:
    """The spec of a project's retraining: what the caller gave (``None``: not given), the
    rest from the task's defaults. A classification project's defaults are ``RetrainSpec``'s;
    a detection project's are its default detector's recipe (``detection.models``), without
    flips (a mirrored digit is another glyph; ask for ``augment="flip"`` for natural objects),
    and no pruning or quantization."""
    from quarkflow_core.projects import is_detection

    given = {k: v for k, v in given.items() if v is not None}
    if not is_detection(session=session, project_id=project_id):
        return RetrainSpec(**given)
    from quarkflow_core.detection.models import detector_spec
    from quarkflow_core.detection.train import DEFAULT_DETECTOR

    recipe = detector_spec(given.get("architecture", DEFAULT_DETECTOR))
    if given.get("prune_ratio"):
        raise InvalidInput(
            "pruning is not offered for detectors: channel pruning of their backbones gave no "
            "real speed-up on CPU (see docs/detection.md); leave prune_ratio unset"
        )
    if given.get("quantize"):
        raise InvalidInput(
            "INT8 quantization is not offered for detectors (classifiers only); leave "
            "quantize unset"
        )
    defaults = {
        "architecture": recipe.name,
        "epochs": recipe.epochs,
        "batch_size": recipe.batch_size,
        "lr": recipe.lr,
        "augment": "none",
    }
    return RetrainSpec(**{**defaults, **given})


def is_detection_spec(spec: RetrainSpec) -> bool:
    from quarkflow_core.detection.models import list_detectors

    return spec.architecture in list_detectors()


def existing_candidate(
    *, session: Session, key: str, project_id: int = DEFAULT_PROJECT_ID
) -> ModelVersion | None:
    """The project's version a previous run with the same key registered (its candidate)."""
    for row in session.scalars(
        select(ModelVersion)
        .where(ModelVersion.project_id == project_id)
        .order_by(ModelVersion.version.desc())
    ):
        if row.manifest.get("retrain", {}).get("key") == key and row.manifest["retrain"].get(
            "candidate"
        ):
            return row
    return None


def snapshot_key(
    *,
    session: Session,
    snapshot_id: int,
    spec: RetrainSpec,
    project_id: int = DEFAULT_PROJECT_ID,
) -> str:
    snap = get_snapshot(session=session, snapshot_id=snapshot_id, project_id=project_id)
    return spec.key(snap.content_hash)


def train_step(
    *,
    session: Session,
    storage: Storage,
    snapshot_id: int,
    spec: RetrainSpec,
    out_root: str | Path,
    progress: Any = None,
    project_id: int = DEFAULT_PROJECT_ID,
) -> dict[str, Any]:
    """Train + calibrate + evaluate on the snapshot's hold-out (+ k-fold); a fresh folder per
    try."""
    from quarkflow_core.training_runs import headline, train_from_snapshot

    out = Path(out_root) / f"run-{uuid.uuid4().hex[:12]}"
    if is_detection_spec(spec):
        from quarkflow_core.detection.training import train_detector_from_snapshot

        outcome = train_detector_from_snapshot(
            session=session,
            storage=storage,
            snapshot_id=snapshot_id,
            config=spec.detector_config(),
            out_dir=out,
            progress=progress,
            project_id=project_id,
        )
        return {
            "artifact_dir": str(outcome.artifact_dir),
            "run_id": outcome.run_id,
            "metrics": outcome.headline,
            "device": outcome.summary.get("device"),
        }
    outcome = train_from_snapshot(
        session=session,
        storage=storage,
        snapshot_id=snapshot_id,
        config=spec.train_config(),
        out_dir=out,
        kfold=spec.kfold,
        progress=progress,
        project_id=project_id,
    )
    return {
        "artifact_dir": str(outcome.artifact_dir),
        "run_id": outcome.run_id,
        "metrics": headline(outcome.metrics),
        "device": outcome.summary.get("device"),
    }


def _variant_inputs(
    session: Session, storage: Storage, artifact_dir: str, snapshot_id: int, project_id: int
) -> tuple[Any, dict[Any, Any]]:
    """A variant's inputs (pruning, INT8): the artifact, loaded, and the snapshot's splits
    decoded at its preset."""
    from quarkflow_core.ml.artifacts import load_artifact
    from quarkflow_core.ml.data import load_snapshot

    loaded = load_artifact(artifact_dir)
    data = load_snapshot(
        session=session,
        storage=storage,
        snapshot_id=snapshot_id,
        preset=loaded.preset,
        project_id=project_id,
    )
    return loaded, data


def prune_step(
    *,
    session: Session,
    storage: Storage,
    artifact_dir: str,
    snapshot_id: int,
    spec: RetrainSpec,
    project_id: int = DEFAULT_PROJECT_ID,
) -> dict[str, Any]:
    from quarkflow_core.ml.variants import prune_artifact

    loaded, data = _variant_inputs(session, storage, artifact_dir, snapshot_id, project_id)
    out = Path(artifact_dir).parent / f"{Path(artifact_dir).name}-pruned-{uuid.uuid4().hex[:6]}"
    report, _ = prune_artifact(
        loaded,
        train=data[Split.TRAIN],
        holdout=data[Split.HOLDOUT],
        ratio=spec.prune_ratio,
        recover_epochs=spec.recover_epochs,
        out_dir=out,
    )
    return {"artifact_dir": str(out), "report": report}


def quantize_step(
    *,
    session: Session,
    storage: Storage,
    artifact_dir: str,
    snapshot_id: int,
    out_dir: str | Path | None = None,
    max_loss_points: float = 0.5,
    project_id: int = DEFAULT_PROJECT_ID,
) -> dict[str, Any]:
    """INT8 variant of a classifier artifact (``ml.variants.quantize_artifact``): calibrated on
    the snapshot's train split, judged on its hold-out, written next to the artifact (or to
    ``out_dir``). Refused for detectors and when the accuracy loss exceeds
    ``max_loss_points``."""
    from quarkflow_core.ml.variants import quantize_artifact

    manifest = json.loads((Path(artifact_dir) / "manifest.json").read_text())
    if manifest.get("task") == "detection":
        raise InvalidInput(
            "INT8 quantization is not offered for detectors (classifiers only); leave "
            "quantize unset"
        )
    loaded, data = _variant_inputs(session, storage, artifact_dir, snapshot_id, project_id)
    session.commit()  # end the read transaction before the minutes of quantizing (SQLite)
    out = out_dir or (
        Path(artifact_dir).parent / f"{Path(artifact_dir).name}-int8-{uuid.uuid4().hex[:6]}"
    )
    report, sha = quantize_artifact(
        loaded,
        train=data[Split.TRAIN],
        holdout=data[Split.HOLDOUT],
        out_dir=out,
        max_loss_points=max_loss_points,
    )
    return {"artifact_dir": str(out), "report": report, "sha256": sha}


def export_step(
    *,
    session: Session,
    storage: Storage,
    artifact_dir: str,
    snapshot_id: int,
    fmt: str,
    project_id: int = DEFAULT_PROJECT_ID,
) -> float:
    """Export inside the (unregistered) artifact; parity checked on hold-out images."""
    from quarkflow_core.ml.artifacts import load_artifact
    from quarkflow_core.ml.variants import export_artifact
    from quarkflow_core.training_runs import load_holdout

    manifest = json.loads((Path(artifact_dir) / "manifest.json").read_text())
    if manifest.get("task") == "detection":
        from quarkflow_core.detection.training import export_detector_step

        return export_detector_step(
            session=session,
            storage=storage,
            artifact_dir=artifact_dir,
            snapshot_id=snapshot_id,
            fmt=fmt,
            project_id=project_id,
        )
    loaded = load_artifact(artifact_dir)
    if (Path(artifact_dir) / ("model.onnx" if fmt == "onnx" else "model.ts")).exists():
        return float(loaded.manifest["exports"][fmt]["parity_max_abs_diff"])  # a retried step
    _, holdout = load_holdout(
        session=session,
        storage=storage,
        snapshot_id=snapshot_id,
        preset=loaded.preset,
        project_id=project_id,
    )
    return export_artifact(loaded, fmt=fmt, images=holdout.images[:64])


def register_step(
    *,
    session: Session,
    storage: Storage,
    key: str,
    artifact_dir: str,
    parent_dir: str | list[str] | None,
    actor: str,
    cache_root: str | Path,
    policy: Any = None,
    project_id: int = DEFAULT_PROJECT_ID,
) -> dict[str, Any]:
    """Register (the parents first, oldest first, when the candidate is a variant: pruned,
    INT8, or INT8 of a pruned one), make the candidate the challenger, and judge it against
    the champion. Each variant's ``parent`` link is pointed at its registered parent (the
    parent's manifest changed after the variant was made: its export, its ``retrain`` key).
    Idempotent."""
    parents = [parent_dir] if isinstance(parent_dir, str) else list(parent_dir or [])
    parent_row = None
    for folder in parents:
        parent_row = _register_in_chain(
            session=session,
            storage=storage,
            folder=folder,
            key=key,
            candidate=False,
            parent=parent_row,
            actor=actor,
            project_id=project_id,
        )
    row = _register_in_chain(
        session=session,
        storage=storage,
        folder=artifact_dir,
        key=key,
        candidate=True,
        parent=parent_row,
        actor=actor,
        project_id=project_id,
        as_challenger=True,
    )
    return judge(
        session=session,
        storage=storage,
        row=row,
        cache_root=cache_root,
        policy=policy,
        project_id=project_id,
    )


def _register_in_chain(
    *,
    session: Session,
    storage: Storage,
    folder: str,
    key: str,
    candidate: bool,
    parent: ModelVersion | None,
    actor: str,
    project_id: int,
    as_challenger: bool = False,
) -> ModelVersion:
    from quarkflow_core import registry
    from quarkflow_core.ml.artifacts import add_files, verify_artifact

    manifest = verify_artifact(folder)
    if "retrain" not in manifest:
        manifest = {**manifest, "retrain": {"key": key, "candidate": candidate}}
        add_files(folder, [], retrain=manifest["retrain"])
    link = manifest.get("parent") or {}
    if parent is not None and link.get("manifest_sha256") != parent.sha256:
        add_files(folder, [], parent={**link, "manifest_sha256": parent.sha256})
    return registry.register_version(
        session=session,
        storage=storage,
        artifact_dir=folder,
        created_by=actor,
        as_challenger=as_challenger,
        project_id=project_id,
    )


def judge(
    *,
    session: Session,
    storage: Storage,
    row: ModelVersion,
    cache_root: str | Path,
    policy=None,
    project_id: int = DEFAULT_PROJECT_ID,
) -> dict[str, Any]:
    from quarkflow_core import registry

    proposal = registry.propose(
        session=session,
        storage=storage,
        ref=row,
        cache_root=cache_root,
        config=policy,
        project_id=project_id,
    )
    comparison = proposal.evidence.get("comparison") or {}
    out = {
        "version": row.version,
        "sha256": row.sha256,
        "metrics": dict(row.metrics),
        "champion": proposal.champion.version if proposal.champion else None,
        "policy": proposal.policy.to_dict(),
        "evidence_sha256": proposal.evidence_sha256,
    }
    if row.manifest.get("task") == "detection":
        return {
            **out,
            "map_champion": comparison.get("map_a"),
            "map_candidate": comparison.get("map_b"),
            "map_diff_ci": [comparison["ci_low"], comparison["ci_high"]] if comparison else None,
        }
    return {
        **out,
        "accuracy_champion": comparison.get("accuracy_a"),
        "accuracy_candidate": comparison.get("accuracy_b"),
        "mcnemar_p": (comparison.get("mcnemar") or {}).get("p_value"),
    }


def report_markdown(result: dict[str, Any]) -> str:
    """The flow's final report (a Prefect markdown artifact)."""
    snap = result.get("snapshot", {})
    cand = result.get("candidate", {})
    policy = cand.get("policy", {})
    fresh = "reused" if result.get("reused") else "new"
    project = result.get("project") or DEFAULT_PROJECT
    named = project != DEFAULT_PROJECT
    cli = f"quarkflow --project {project}" if named else "quarkflow"
    where = f" in project {project}" if named else ""
    lines = [
        f"# Retrain: candidate v{cand.get('version')}{where} ({fresh})",
        "",
        "| | |",
        "|---|---|",
        f"| snapshot | #{snap.get('snapshot_id')}: {snap.get('train')} train, "
        f"{snap.get('holdout')} hold-out ({snap.get('holdout_grown', 0)} grown from settled "
        f"labels), sources {snap.get('sources')} |",
        f"| champion | v{cand.get('champion')} |",
    ]
    if "map_candidate" in cand:
        lines += [
            f"| hold-out mAP (champion -> candidate) | {cand.get('map_champion')} -> "
            f"{cand.get('map_candidate')} |",
            f"| mAP difference, 95% bootstrap CI | {cand.get('map_diff_ci')} |",
        ]
    else:
        lines += [
            f"| hold-out accuracy (champion -> candidate) | {cand.get('accuracy_champion')} -> "
            f"{cand.get('accuracy_candidate')} |",
            f"| McNemar p | {cand.get('mcnemar_p')} |",
        ]
    lines += [f"| policy | **{policy.get('verdict')}** |"]
    lines += [
        f"| {c['name']} | {'pass' if c['passed'] else 'FAIL'}: {c['detail']} |"
        for c in policy.get("checks", [])
    ]
    if result.get("prune"):
        lines.append(f"| pruning | {result['prune']} |")
    if result.get("quantize", {}).get("refused"):
        lines.append(f"| INT8 (ONNX Runtime, QDQ) | refused: {result['quantize']['refused']} |")
    elif result.get("quantize"):
        q = result["quantize"]
        lines.append(
            f"| INT8 (ONNX Runtime, QDQ) | hold-out accuracy {q['accuracy_fp32']:.2%} fp32 -> "
            f"{q['accuracy_int8']:.2%} INT8 ({q['accuracy_loss_points']:+.2f} points lost), "
            f"agreement {q['agreement']:.2%}, size x{q['size_ratio']:.2f}, batch-1 latency "
            f"x{1 / q['speedup_b1']:.2f}, batch-32 throughput x{q['speedup_b32']:.2f} |"
        )
    lines += [
        "",
        "Approve or reject it in the workbench, the API or "
        f"`{cli} models approve v{cand.get('version')} --reason ...`.",
    ]
    return "\n".join(lines)

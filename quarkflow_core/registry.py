"""The model registry: immutable versions, the ``champion`` / ``challenger`` aliases, the
promotion policy, human approval with a frozen evidence bundle, rollback and history.

Rules kept here, whatever the caller (CLI, API, workbench, flows):

* A version is registered once. Its files are uploaded to storage under
  ``models/<manifest sha256>/`` *before* its row is inserted, manifest last, so a crash leaves
  at most unreferenced blobs, never a half-registered version; re-registering the same artifact
  returns the existing version.
* Every file is checked against its sha256 (and the manifest against the registered sha256)
  when a version is promoted, rolled back to, or materialised for serving.
* The policy only advises. Moving ``champion`` needs a user with role ``ml_lead`` and a reason;
  overriding a failing policy needs ``override=True`` and a longer, written reason.
* The alias move, the append-only promotion event (with the evidence and its sha256) and the
  audit row are written in one transaction, under a registry lock (an advisory lock on
  Postgres, the database write lock on SQLite). The decision records which champion it was
  made against; if another lead moved the champion meanwhile the second decision is refused
  with ``Conflict`` rather than silently overwriting it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import delete, func, select, text
from sqlalchemy.orm import Session

from quarkflow_core.database import begin_write
from quarkflow_core.errors import Conflict, InvalidInput, NotFound, ObjectNotFound
from quarkflow_core.ml.artifacts import (
    MANIFEST,
    ArtifactIntegrityError,
    manifest_sha256,
    verify_artifact,
)
from quarkflow_core.schema import (
    DatasetSnapshot,
    ModelAlias,
    ModelVersion,
    PromotionAction,
    PromotionEvent,
    Role,
    TrainingRun,
    User,
    json_safe,
    utcnow,
)
from quarkflow_core.storage import Storage
from quarkflow_core.users import record_audit, require_role

CHAMPION, CHALLENGER = "champion", "challenger"
ALIASES = (CHAMPION, CHALLENGER)
MIN_REASON = 3
MIN_OVERRIDE_REASON = 20
_PG_LOCK_KEY = 0x51F10A  # pg_advisory_xact_lock key for registry writes


# --------------------------------------------------------------------------- lookups


def _headline(metrics: dict[str, Any]) -> dict[str, Any]:
    from quarkflow_core.training import headline

    return headline(metrics)


def get_version(*, session: Session, ref: str | int) -> ModelVersion:
    """``3``, ``"3"``, ``"v3"``, ``"champion"`` or ``"challenger"``."""
    text_ref = str(ref).strip().lower()
    if text_ref in ALIASES:
        alias = session.get(ModelAlias, text_ref, populate_existing=True)
        if alias is None:
            raise NotFound(f"there is no {text_ref} yet")
        return session.get(ModelVersion, alias.version_id)
    number = text_ref[1:] if text_ref.startswith("v") else text_ref
    if not (number.isascii() and number.isdigit()) or len(number) > 9:
        raise InvalidInput(f"{ref!r} is not a version: use 3, v3, champion or challenger")
    row = session.scalar(select(ModelVersion).where(ModelVersion.version == int(number)))
    if row is None:
        raise NotFound(f"no model version v{number}")
    return row


def aliases(*, session: Session) -> dict[str, ModelVersion]:
    rows = session.execute(
        select(ModelAlias.alias, ModelVersion).join(
            ModelVersion, ModelVersion.id == ModelAlias.version_id
        )
    ).all()
    return {alias: version for alias, version in rows}


def alias_of(*, session: Session, alias: str) -> ModelVersion | None:
    row = session.get(ModelAlias, alias, populate_existing=True)
    return None if row is None else session.get(ModelVersion, row.version_id)


def list_versions(*, session: Session) -> list[ModelVersion]:
    return list(session.scalars(select(ModelVersion).order_by(ModelVersion.version)))


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


# --------------------------------------------------------------------------- storage + integrity


def storage_prefix(sha256: str) -> str:
    return f"models/{sha256}"


def _lock(session: Session) -> None:
    """Serialise registry writes. Ends the caller's transaction first: on SQLite the write lock
    must be the first statement of a transaction to be taken on a fresh snapshot."""
    session.commit()
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_LOCK_KEY})
    else:
        begin_write(session)


def register_version(
    *,
    session: Session,
    storage: Storage,
    artifact_dir: str | Path,
    created_by: str,
    as_challenger: bool = False,
) -> ModelVersion:
    """Upload a verified artifact folder and record it as the next version (idempotent)."""
    folder = Path(artifact_dir)
    manifest = verify_artifact(folder)
    sha = manifest_sha256(folder)
    existing = session.scalar(select(ModelVersion).where(ModelVersion.sha256 == sha))
    if existing is None:
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
        existing = session.scalar(select(ModelVersion).where(ModelVersion.sha256 == sha))
    if existing is not None:
        if as_challenger:
            set_challenger(session=session, version=existing, actor=created_by)
        return existing

    dataset, training = manifest.get("dataset", {}), manifest.get("training", {})
    snap_id = dataset.get("snapshot_id")
    run_id = training.get("run_id")
    parent_sha = manifest.get("parent", {}).get("manifest_sha256")
    parent = (
        session.scalar(select(ModelVersion).where(ModelVersion.sha256 == parent_sha))
        if parent_sha
        else None
    )
    number = (session.scalar(select(func.max(ModelVersion.version))) or 0) + 1
    row = ModelVersion(
        version=number,
        architecture=manifest["architecture"],
        classes=list(manifest["classes"]),
        artifact_key=storage_prefix(sha),
        sha256=sha,
        metrics=json_safe(_headline(manifest.get("metrics", {}))),
        manifest=json_safe(manifest),
        snapshot_id=snap_id if snap_id and session.get(DatasetSnapshot, snap_id) else None,
        training_run_id=run_id if run_id and session.get(TrainingRun, run_id) else None,
        parent_version_id=parent.id if parent else None,
        size_bytes=sum(int(f["size"]) for f in manifest["files"].values()),
        created_by=created_by,
    )
    session.add(row)
    session.flush()
    record_audit(
        session=session,
        actor=None,
        action="models.register",
        outcome="ok",
        target_type="model_version",
        target_id=number,
        detail={"by": created_by, "sha256": sha, "architecture": row.architecture},
    )
    session.commit()
    if as_challenger:
        set_challenger(
            session=session, version=row, actor=created_by, reason="registered as challenger"
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
    """Materialise, verify and load a version as an ml.artifacts.LoadedModel."""
    from quarkflow_core.ml.artifacts import load_artifact

    path = materialize(storage=storage, row=row, cache_root=cache_root)
    return load_artifact(path, expected_sha256=row.sha256)


# --------------------------------------------------------------------------- comparison + policy


@dataclass(frozen=True)
class PolicyConfig:
    """Thresholds of the promotion policy (settings QF_POLICY_*).

    A margin or drop limit only counts with evidence behind it: accuracy fails when the paired
    McNemar test says the candidate is significantly worse, a class fails when its recall drops
    by more than ``max_class_recall_drop`` *and* a one-sided exact test on the class's paired
    discordant images says the drop is real (p < ``alpha``). One image in ten cannot fail a
    model; a collapsing class does."""

    noninferiority_margin: float = 0.005
    max_class_recall_drop: float = 0.03
    max_ece_increase: float = 0.02
    alpha: float = 0.05

    @classmethod
    def from_settings(cls, settings: Any) -> PolicyConfig:
        return cls(
            noninferiority_margin=settings.policy_noninferiority_margin,
            max_class_recall_drop=settings.policy_max_class_recall_drop,
            max_ece_increase=settings.policy_max_ece_increase,
        )


@dataclass
class PolicyVerdict:
    passed: bool
    verdict: str  # pass | fail | no_champion
    reasons: list[str]
    checks: list[dict[str, Any]] = field(default_factory=list)
    power: dict[str, Any] = field(default_factory=dict)  # what the hold-out can detect

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _accuracy_check(report: dict[str, Any], config: PolicyConfig) -> tuple[bool, str]:
    from quarkflow_core.ml.compare import power_statement

    lo, hi = report["accuracy_delta_ci95"]
    p = report["mcnemar"]["p_value"]
    delta = report["accuracy_delta"]
    margin = config.noninferiority_margin
    stats = f"accuracy {delta:+.2%} (95% CI [{lo:+.2%}, {hi:+.2%}], McNemar p={p:.3g})"
    if p < config.alpha and delta > 0:
        return True, f"significantly better: {stats}"
    if p < config.alpha and delta < 0:
        return False, f"significantly worse: {stats}"
    if lo >= -margin:
        return True, (
            f"not significantly different and non-inferior within the margin: {stats}; "
            f"the CI lower bound {lo:+.2%} ≥ -{margin:.2%}"
        )
    mdd = report["power"]["mdd_accuracy"]
    detects = (
        f"with n={report['n']:,} this hold-out detects differences ≥ {mdd * 100:.1f} points"
        if mdd is not None and mdd <= 1
        else power_statement(report["power"])
    )
    return True, (
        f"not significantly different: {stats}; no evidence of harm, but non-inferiority "
        f"within the -{margin:.2%} margin is not shown at this hold-out size ({detects})"
    )


def _class_recall_check(report: dict[str, Any], config: PolicyConfig) -> tuple[bool, str]:
    limit, alpha = config.max_class_recall_drop, config.alpha

    def shown(c: str, m: dict[str, Any]) -> str:
        ci = m["recall_delta_ci"]
        level = 1 - report.get("alpha", alpha)
        ci_text = f", {level:.0%} CI [{ci[0]:+.1%}, {ci[1]:+.1%}]" if ci else ""
        return (
            f"{c} ({m['recall_delta']:+.1%}: {m['lost']} lost / {m['gained']} gained of "
            f"{m['n']}, p={m['p_worse']:.2g}{ci_text})"
        )

    per_class = report["per_class"]
    failing = {
        c: m for c, m in per_class.items() if m["p_worse"] < alpha and -m["recall_delta"] > limit
    }
    rule = (
        f"one-sided exact binomial test on the class's paired discordant images, α = {alpha:g}; "
        f"recall-difference CI: Newcombe's paired score interval"
    )
    if failing:
        listed = ", ".join(
            shown(c, m) for c, m in sorted(failing.items(), key=lambda x: x[1]["recall_delta"])
        )
        return False, (
            f"recall drops significantly and by more than {limit:.1%} for class {listed} ({rule})"
        )
    if not per_class:
        return True, "no classes to check"
    worst_c, worst = min(per_class.items(), key=lambda x: (x[1]["recall_delta"], x[1]["p_worse"]))
    beyond = [c for c, m in per_class.items() if -m["recall_delta"] > limit]
    unproven = (
        f"; {len(beyond)} class(es) drop by more than {limit:.1%}, but not significantly"
        if beyond
        else ""
    )
    return True, (
        f"no class recall drops significantly by more than {limit:.1%}; largest change "
        f"{shown(worst_c, worst)}{unproven} ({rule})"
    )


def evaluate_policy(report: dict[str, Any] | None, config: PolicyConfig) -> PolicyVerdict:
    """Judge a comparison (A = champion, B = candidate). Advises; never promotes.

    Checks: ``accuracy`` (paired McNemar: fails only when significantly worse; says whether
    non-inferiority within the margin is shown), ``class_recall`` (fails a class only on a
    significant drop beyond the limit), ``calibration`` (fails on an ECE increase beyond the
    margin whose paired bootstrap CI excludes 0) and ``power`` (always
    passes: states the hold-out size and the smallest differences it can detect)."""
    from quarkflow_core.ml.compare import power_statement

    if report is None:
        return PolicyVerdict(True, "no_champion", ["no champion yet: nothing to compare against"])
    checks = []
    ok, why = _accuracy_check(report, config)
    checks.append({"name": "accuracy", "passed": ok, "detail": why})
    ok, why = _class_recall_check(report, config)
    checks.append({"name": "class_recall", "passed": ok, "detail": why})
    ece_delta, margin = report["ece_delta"], config.max_ece_increase
    lo, hi = report.get("ece_delta_ci95") or (ece_delta, ece_delta)
    ok = ece_delta <= margin or lo <= 0  # worse beyond the margin, and not noise
    stats = (
        f"ECE {report['ece_a']:.4f} -> {report['ece_b']:.4f} "
        f"({ece_delta:+.4f}, 95% bootstrap CI [{lo:+.4f}, {hi:+.4f}])"
    )
    if ece_delta <= margin:
        why = f"{stats}, within the +{margin:.3f} margin"
    elif ok:
        why = f"{stats}: beyond the +{margin:.3f} margin, but not significantly worse"
    else:
        why = f"calibration significantly worse: {stats}, beyond the +{margin:.3f} margin"
    checks.append({"name": "calibration", "passed": ok, "detail": why})
    power = dict(report["power"])
    checks.append({"name": "power", "passed": True, "detail": power_statement(power)})
    passed = all(c["passed"] for c in checks)
    reasons = [c["detail"] for c in checks if not c["passed"]] or [c["detail"] for c in checks]
    return PolicyVerdict(passed, "pass" if passed else "fail", reasons, checks, power)


def _comparison_key(a: ModelVersion, b: ModelVersion, snapshot_id: int) -> str:
    return f"comparisons/{a.sha256[:20]}-{b.sha256[:20]}-s{snapshot_id}.json"


def compare_versions(
    *,
    session: Session,
    storage: Storage,
    a: ModelVersion,
    b: ModelVersion,
    cache_root: str | Path,
    snapshot_id: int | None = None,
    alpha: float = 0.05,
) -> dict[str, Any]:
    """Paired comparison of B against A on one hold-out, cached in storage under
    ``comparisons/`` so the workbench and the approval see the same numbers.

    The default hold-out is the newest snapshot's, whichever snapshot either version was
    trained on: the hold-out grows with the labels (``labels.build_training_snapshot``), and
    every comparison is scored on the same, current one. The report names it (``snapshot_id``,
    ``n``, ``power``)."""
    from quarkflow_core.ml.compare import REPORT_FORMAT, compare
    from quarkflow_core.ml.evaluate import measure_latency, predict_proba
    from quarkflow_core.training import default_snapshot_id, load_holdout

    if list(a.classes) != list(b.classes):
        raise InvalidInput(
            f"v{a.version} and v{b.version} predict different class lists; they cannot be compared"
        )
    snap_id = snapshot_id or default_snapshot_id(session=session)
    key = _comparison_key(a, b, snap_id)
    try:
        cached = json.loads(storage.get(key))
        if cached.get("alpha") == alpha and cached.get("report_format") == REPORT_FORMAT:
            return cached
    except ObjectNotFound:
        pass
    la = load_version(storage=storage, row=a, cache_root=cache_root)
    lb = load_version(storage=storage, row=b, cache_root=cache_root)

    def holdout(preset: Any) -> Any:
        return load_holdout(session=session, storage=storage, snapshot_id=snap_id, preset=preset)[1]

    hold_a = holdout(la.preset)
    hold_b = hold_a if lb.preset == la.preset else holdout(lb.preset)
    if list(hold_a.classes) != list(a.classes):
        raise InvalidInput(
            f"snapshot {snap_id} labels {list(hold_a.classes)}, but v{a.version} predicts "
            f"{list(a.classes)}; compare on a snapshot with the models' classes"
        )

    def meta(row: ModelVersion, loaded: Any) -> dict[str, Any]:
        return {
            "size_bytes": row.size_bytes,
            "latency_ms": measure_latency(loaded.model, loaded.preset)["median_ms"],
        }

    meta_a, meta_b = meta(a, la), meta(b, lb)
    report = compare(
        hold_a.labels,
        predict_proba(la.model, hold_a.images, la.preset, temperature=la.temperature),
        predict_proba(lb.model, hold_b.images, lb.preset, temperature=lb.temperature),
        list(a.classes),
        meta_a=meta_a,
        meta_b=meta_b,
        alpha=alpha,
    )
    report.update(
        {
            "a": {"version": a.version, "sha256": a.sha256},
            "b": {"version": b.version, "sha256": b.sha256},
            "snapshot_id": snap_id,
            "power": {**report["power"], "snapshot_id": snap_id},
            "holdout_image_sha256": list(hold_a.ids),  # disagreements index into this
            "meta_a": meta_a,
            "meta_b": meta_b,
        }
    )
    report = json_safe(report)
    storage.put(key, json.dumps(report).encode(), content_type="application/json")
    return report


def evidence_sha256(evidence: dict[str, Any]) -> str:
    text_ = json.dumps(evidence, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text_.encode()).hexdigest()


@dataclass
class Proposal:
    """Everything an ML lead decides on: the candidate, the champion it is judged against,
    the policy verdict, and the evidence bundle that an approval freezes."""

    candidate: ModelVersion
    champion: ModelVersion | None
    policy: PolicyVerdict
    evidence: dict[str, Any]

    @property
    def evidence_sha256(self) -> str:
        return evidence_sha256(self.evidence)


def _pruning_tradeoff(session: Session, row: ModelVersion) -> dict[str, Any]:
    own = row.manifest.get("metrics", {}).get("pruning")
    variants = [
        {
            "version": v.version,
            "accuracy": v.metrics.get("accuracy"),
            "latency_ms_batch1": v.metrics.get("latency_ms_batch1"),
            "size_bytes": v.size_bytes,
            "pruning": v.manifest.get("metrics", {}).get("pruning"),
        }
        for v in session.scalars(
            select(ModelVersion).where(ModelVersion.parent_version_id == row.id)
        )
    ]
    return {"candidate_is_pruned": own is not None, "candidate": own, "variants": variants}


def propose(
    *,
    session: Session,
    storage: Storage,
    ref: str | int | ModelVersion,
    cache_root: str | Path,
    config: PolicyConfig | None = None,
    snapshot_id: int | None = None,
) -> Proposal:
    """Compare a candidate with the current champion and judge it (no state changes)."""
    config = config or PolicyConfig()
    cand = ref if isinstance(ref, ModelVersion) else get_version(session=session, ref=ref)
    champ = alias_of(session=session, alias=CHAMPION)
    report = None
    if champ is not None and champ.id != cand.id:
        report = compare_versions(
            session=session,
            storage=storage,
            a=champ,
            b=cand,
            cache_root=cache_root,
            snapshot_id=snapshot_id,
            alpha=config.alpha,
        )
    policy = evaluate_policy(report, config)
    evidence = json_safe(
        {
            "candidate": summary(cand, session=session),
            "champion": None if champ is None else summary(champ, session=session),
            "comparison": report,
            "policy": policy.to_dict(),
            "policy_config": asdict(config),
            "pruning": _pruning_tradeoff(session, cand),
            "lineage": lineage(session=session, row=cand),
        }
    )
    return Proposal(cand, champ, policy, evidence)


# --------------------------------------------------------------------------- decisions


def _set_alias(session: Session, alias: str, row: ModelVersion, actor: str) -> None:
    current = session.get(ModelAlias, alias, populate_existing=True)
    if current is None:
        session.add(ModelAlias(alias=alias, version_id=row.id, updated_by=actor))
    else:
        current.version_id = row.id
        current.updated_by = actor
        current.updated_at = utcnow()
    session.flush()


def _event(
    session: Session,
    *,
    action: PromotionAction,
    alias: str,
    from_id: int | None,
    to: ModelVersion | None,
    user: User | None,
    actor: str,
    reason: str,
    evidence: dict[str, Any],
    policy_verdict: str | None = None,
) -> PromotionEvent:
    evidence = json_safe(evidence)
    event = PromotionEvent(
        action=action,
        alias=alias,
        from_version_id=from_id,
        to_version_id=to.id if to else None,
        actor_id=user.id if user else None,
        actor=actor,
        reason=reason,
        policy_verdict=policy_verdict,
        evidence=evidence,
        evidence_sha256=evidence_sha256(evidence),
    )
    session.add(event)
    session.flush()
    return event


def _check_reason(reason: str | None, *, minimum: int = MIN_REASON, why: str = "") -> str:
    reason = (reason or "").strip()
    if len(reason) < minimum:
        raise InvalidInput(f"a reason of at least {minimum} characters is required{why}")
    return reason


def _refuse(session: Session, user: User, action: str, target: ModelVersion, why: str) -> None:
    """Record a refused decision in the audit log; it outlives the caller's rollback."""
    session.rollback()
    begin_write(session)
    record_audit(
        session=session,
        actor=user,
        action=action,
        outcome="refused",
        target_type="model_version",
        target_id=target.version,
        detail={"why": why},
    )
    session.commit()


def set_challenger(
    *, session: Session, version: ModelVersion, actor: str, reason: str = "set as challenger"
) -> PromotionEvent | None:
    """Point ``challenger`` at a version (flows do this after registering a candidate)."""
    _lock(session)
    current = alias_of(session=session, alias=CHALLENGER)
    champ = alias_of(session=session, alias=CHAMPION)
    if (current and current.id == version.id) or (champ and champ.id == version.id):
        session.commit()
        return None
    _set_alias(session, CHALLENGER, version, actor)
    event = _event(
        session,
        action=PromotionAction.SET_CHALLENGER,
        alias=CHALLENGER,
        from_id=current.id if current else None,
        to=version,
        user=None,
        actor=actor,
        reason=reason,
        evidence={"candidate": summary(version, session=session)},
    )
    session.commit()
    return event


def _move_champion(
    session: Session,
    *,
    action: PromotionAction,
    target: ModelVersion,
    expected_from: ModelVersion | None,
    user: User,
    reason: str,
    evidence: dict[str, Any],
    policy_verdict: str | None,
) -> PromotionEvent:
    """The one transaction: lock, check nobody moved the champion, move it, record event +
    audit, commit."""
    expected_id = expected_from.id if expected_from else None
    expected_no = expected_from.version if expected_from else None
    target_id, target_no = target.id, target.version
    _lock(session)
    current = session.get(ModelAlias, CHAMPION, populate_existing=True)
    current_id = current.version_id if current else None
    if current_id != expected_id:
        now = session.get(ModelVersion, current_id).version if current_id else None
        session.rollback()
        why = (
            f"the champion changed while this decision was being made (judged against "
            f"v{expected_no}, now v{now}); review the new comparison and decide again"
        )
        _refuse(session, user, f"models.{action.value}", target, why)
        raise Conflict(why)
    target = session.get(ModelVersion, target_id)
    _set_alias(session, CHAMPION, target, user.username)
    challenger = session.get(ModelAlias, CHALLENGER, populate_existing=True)
    if challenger is not None and challenger.version_id == target_id:
        session.execute(delete(ModelAlias).where(ModelAlias.alias == CHALLENGER))
    event = _event(
        session,
        action=action,
        alias=CHAMPION,
        from_id=expected_id,
        to=target,
        user=user,
        actor=user.username,
        reason=reason,
        evidence=evidence,
        policy_verdict=policy_verdict,
    )
    record_audit(
        session=session,
        actor=user,
        action=f"models.{action.value}",
        outcome="ok",
        target_type="model_version",
        target_id=target_no,
        detail={
            "from": expected_no,
            "to": target_no,
            "event_id": event.id,
            "evidence_sha256": event.evidence_sha256,
        },
    )
    session.commit()
    return event


def _integrity_or_refuse(
    session: Session, storage: Storage, user: User, action: str, row: ModelVersion
) -> None:
    try:
        verify_stored(storage=storage, row=row)
    except ArtifactIntegrityError as exc:
        _refuse(session, user, action, row, exc.detail)
        raise


def approve(
    *,
    session: Session,
    storage: Storage,
    version: str | int | ModelVersion,
    user: User,
    reason: str,
    cache_root: str | Path,
    override: bool = False,
    config: PolicyConfig | None = None,
    proposal: Proposal | None = None,
) -> PromotionEvent:
    """Make ``version`` the champion. Needs role ml_lead and a reason; a failing policy needs
    ``override=True`` and a written reason of at least 20 characters. ``proposal`` lets a UI
    approve exactly the evidence it showed (it must be for the same version)."""
    action = "models.approve"
    require_role(session=session, user=user, allowed={Role.ML_LEAD}, action=action)
    reason = _check_reason(reason)
    cand = (
        version if isinstance(version, ModelVersion) else get_version(session=session, ref=version)
    )
    champ = alias_of(session=session, alias=CHAMPION)
    if champ is not None and champ.id == cand.id:
        raise InvalidInput(f"v{cand.version} is already the champion")
    _integrity_or_refuse(session, storage, user, action, cand)
    if proposal is None or proposal.candidate.id != cand.id:
        proposal = propose(
            session=session, storage=storage, ref=cand, cache_root=cache_root, config=config
        )
    verdict = proposal.policy.verdict
    if not proposal.policy.passed:
        if not override:
            why = "; ".join(proposal.policy.reasons)
            _refuse(session, user, action, cand, f"policy failed: {why}")
            raise InvalidInput(
                f"the promotion policy fails v{cand.version}: {why}. To approve anyway, "
                f"override with a written reason of at least {MIN_OVERRIDE_REASON} characters",
                code="policy_failed",
            )
        reason = _check_reason(
            reason, minimum=MIN_OVERRIDE_REASON, why=" to override a failing policy verdict"
        )
        verdict = "fail (overridden)"
    return _move_champion(
        session,
        action=PromotionAction.APPROVE,
        target=cand,
        expected_from=proposal.champion,
        user=user,
        reason=reason,
        evidence=proposal.evidence,
        policy_verdict=verdict,
    )


def reject(
    *, session: Session, version: str | int | ModelVersion, user: User, reason: str
) -> PromotionEvent:
    """Decline a candidate: recorded, and it stops being the challenger."""
    action = "models.reject"
    require_role(session=session, user=user, allowed={Role.ML_LEAD}, action=action)
    reason = _check_reason(reason)
    cand = (
        version if isinstance(version, ModelVersion) else get_version(session=session, ref=version)
    )
    cand_id, cand_no = cand.id, cand.version
    _lock(session)
    champ = alias_of(session=session, alias=CHAMPION)
    if champ is not None and champ.id == cand_id:
        session.rollback()
        raise InvalidInput(
            f"v{cand_no} is the champion; roll back to another version instead of rejecting it"
        )
    cand = session.get(ModelVersion, cand_id)
    challenger = session.get(ModelAlias, CHALLENGER, populate_existing=True)
    if challenger is not None and challenger.version_id == cand_id:
        session.execute(delete(ModelAlias).where(ModelAlias.alias == CHALLENGER))
    event = _event(
        session,
        action=PromotionAction.REJECT,
        alias=CHALLENGER,
        from_id=cand_id,
        to=None,
        user=user,
        actor=user.username,
        reason=reason,
        evidence={"candidate": summary(cand, session=session)},
    )
    record_audit(
        session=session,
        actor=user,
        action=action,
        outcome="ok",
        target_type="model_version",
        target_id=cand_no,
        detail={"event_id": event.id},
    )
    session.commit()
    return event


def champion_stack(*, session: Session) -> list[int]:
    """Version ids that have been champion, oldest first, with rolled-back ones popped:
    approve pushes; rollback to an earlier entry truncates back to it."""
    stack: list[int] = []
    for ev in history(session=session, alias=CHAMPION):
        if ev.to_version_id is None:
            continue
        if ev.action == PromotionAction.ROLLBACK and ev.to_version_id in stack:
            del stack[stack.index(ev.to_version_id) + 1 :]
        else:
            stack.append(ev.to_version_id)
    return stack


def rollback(
    *,
    session: Session,
    storage: Storage,
    user: User,
    reason: str,
    to: str | int | ModelVersion | None = None,
) -> PromotionEvent:
    """Move ``champion`` back to the previous champion, or to any earlier version ``to``."""
    action = "models.rollback"
    require_role(session=session, user=user, allowed={Role.ML_LEAD}, action=action)
    reason = _check_reason(reason)
    champ = alias_of(session=session, alias=CHAMPION)
    if champ is None:
        raise InvalidInput("there is no champion to roll back")
    if to is None:
        stack = champion_stack(session=session)
        if len(stack) < 2:
            raise InvalidInput(
                f"v{champ.version} is the first champion; name the version to roll back to"
            )
        target = session.get(ModelVersion, stack[-2])
    else:
        target = to if isinstance(to, ModelVersion) else get_version(session=session, ref=to)
    if target.id == champ.id:
        raise InvalidInput(f"v{target.version} is already the champion")
    _integrity_or_refuse(session, storage, user, action, target)
    evidence = {
        "from": summary(champ, session=session),
        "to": summary(target, session=session),
    }
    return _move_champion(
        session,
        action=PromotionAction.ROLLBACK,
        target=target,
        expected_from=champ,
        user=user,
        reason=reason,
        evidence=evidence,
        policy_verdict=None,
    )


# --------------------------------------------------------------------------- history


def history(*, session: Session, alias: str | None = None) -> list[PromotionEvent]:
    """Every promotion event (optionally for one alias), oldest first."""
    q = select(PromotionEvent).order_by(PromotionEvent.created_at, PromotionEvent.id)
    if alias is not None:
        q = q.where(PromotionEvent.alias == alias)
    return list(session.scalars(q))


def champion_at(*, session: Session, when: datetime) -> ModelVersion | None:
    """The version that was champion at time ``when`` (None before the first approval)."""
    event = session.scalar(
        select(PromotionEvent)
        .where(
            PromotionEvent.alias == CHAMPION,
            PromotionEvent.to_version_id.is_not(None),
            PromotionEvent.created_at <= when,
        )
        .order_by(PromotionEvent.created_at.desc(), PromotionEvent.id.desc())
        .limit(1)
    )
    return None if event is None else session.get(ModelVersion, event.to_version_id)


def event_dict(*, session: Session, event: PromotionEvent) -> dict[str, Any]:
    def number(vid: int | None) -> int | None:
        return None if vid is None else session.get(ModelVersion, vid).version

    return {
        "id": event.id,
        "at": event.created_at.isoformat(),
        "action": event.action.value,
        "alias": event.alias,
        "from_version": number(event.from_version_id),
        "to_version": number(event.to_version_id),
        "actor": event.actor,
        "reason": event.reason,
        "policy_verdict": event.policy_verdict,
        "evidence_sha256": event.evidence_sha256,
    }


def verify_event(event: PromotionEvent) -> bool:
    """True when the stored evidence still hashes to the recorded sha256."""
    return evidence_sha256(event.evidence) == event.evidence_sha256

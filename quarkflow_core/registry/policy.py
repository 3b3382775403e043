"""Comparison and policy: what an ML lead decides on, with no state changed.

``compare_versions`` scores two versions on the same hold-out (cached in storage, so the
workbench and the approval see the same numbers); ``evaluate_policy`` judges that comparison
against ``PolicyConfig`` and only advises; ``propose`` bundles candidate, champion, verdict,
pruning trade-off and lineage into the evidence that an approval freezes (``Proposal``).

Per project (``project_id``): the champion, the versions and the default hold-out (the
project's newest snapshot) are the project's; ``PolicyConfig.for_project`` applies the
project's policy overrides to the QF_POLICY_* thresholds."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from quarkflow_core.errors import InvalidInput, ObjectNotFound
from quarkflow_core.registry.events import evidence_sha256
from quarkflow_core.registry.lookups import (
    CHAMPION,
    alias_of,
    get_version,
    in_project,
    lineage,
    summary,
)
from quarkflow_core.registry.versions import load_version
from quarkflow_core.schema import DEFAULT_PROJECT_ID, ModelVersion, json_safe
from quarkflow_core.storage import Storage


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
    map_margin: float = 0.01  # detection: non-inferiority margin of the mAP difference
    max_class_ap_drop: float = 0.10  # detection: a class's AP drop the policy flags

    @classmethod
    def from_settings(cls, settings: Any = None) -> PolicyConfig:
        """The thresholds QF_POLICY_* set (``settings`` defaults to ``get_settings()``);
        ``alpha`` keeps its default."""
        if settings is None:
            from quarkflow_core.config import get_settings

            settings = get_settings()
        return cls(
            noninferiority_margin=settings.policy_noninferiority_margin,
            max_class_recall_drop=settings.policy_max_class_recall_drop,
            max_ece_increase=settings.policy_max_ece_increase,
        )

    @classmethod
    def for_project(
        cls, *, session: Session, project_id: int = DEFAULT_PROJECT_ID, settings: Any = None
    ) -> PolicyConfig:
        """The QF_POLICY_* thresholds with the project's policy overrides (``Project.policy``,
        e.g. ``{"noninferiority_margin": 0.01}``) applied; unknown keys are ignored."""
        from quarkflow_core.projects import get_project

        overrides = dict(get_project(session=session, ref=project_id).policy or {})
        names = {f.name for f in fields(cls)}
        known = {k: v for k, v in overrides.items() if k in names and v is not None}
        try:
            return replace(cls.from_settings(settings), **{k: float(v) for k, v in known.items()})
        except (TypeError, ValueError):
            raise InvalidInput(f"project {project_id}: bad policy overrides {known}") from None


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
    if report.get("task") == "detection":
        from quarkflow_core.detection.registry import detection_policy

        return detection_policy(report, config)
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
    project_id: int = DEFAULT_PROJECT_ID,
) -> dict[str, Any]:
    """Paired comparison of B against A on one hold-out, cached in storage under
    ``comparisons/`` so the workbench and the approval see the same numbers.

    The default hold-out is the newest snapshot's, whichever snapshot either version was
    trained on: the hold-out grows with the labels (``labels.build_training_snapshot``), and
    every comparison is scored on the same, current one. The report names it (``snapshot_id``,
    ``n``, ``power``). Both versions and the snapshot must be the project's."""
    from quarkflow_core.datasets import get_snapshot
    from quarkflow_core.ml.compare import REPORT_FORMAT, compare
    from quarkflow_core.ml.quantize import requires_onnxruntime, served_latency_ms, served_proba
    from quarkflow_core.training_runs import default_snapshot_id, load_holdout

    in_project(a, project_id)
    in_project(b, project_id)
    from quarkflow_core.detection.registry import REPORT_FORMAT as DETECTION_FORMAT
    from quarkflow_core.detection.registry import compare_detector_versions, is_detector

    detectors = is_detector(a), is_detector(b)
    if detectors[0] != detectors[1]:
        raise InvalidInput(f"v{a.version} and v{b.version} are not both detectors")
    if list(a.classes) != list(b.classes):
        raise InvalidInput(
            f"v{a.version} and v{b.version} predict different class lists; they cannot be compared"
        )
    snap_id = snapshot_id or default_snapshot_id(session=session, project_id=project_id)
    get_snapshot(session=session, snapshot_id=snap_id, project_id=project_id)
    key = _comparison_key(a, b, snap_id)
    fmt = DETECTION_FORMAT if detectors[0] else REPORT_FORMAT
    try:
        cached = json.loads(storage.get(key))
        if cached.get("alpha") == alpha and cached.get("report_format") == fmt:
            return cached
    except ObjectNotFound:
        pass
    if detectors[0]:
        report = json_safe(
            compare_detector_versions(
                session=session,
                storage=storage,
                a=a,
                b=b,
                cache_root=cache_root,
                snapshot_id=snap_id,
                alpha=alpha,
                project_id=project_id,
            )
        )
        storage.put(key, json.dumps(report).encode(), content_type="application/json")
        return report
    la = load_version(storage=storage, row=a, cache_root=cache_root)
    lb = load_version(storage=storage, row=b, cache_root=cache_root)

    def holdout(preset: Any) -> Any:
        return load_holdout(
            session=session,
            storage=storage,
            snapshot_id=snap_id,
            preset=preset,
            project_id=project_id,
        )[1]

    hold_a = holdout(la.preset)
    hold_b = hold_a if lb.preset == la.preset else holdout(lb.preset)
    if list(hold_a.classes) != list(a.classes):
        raise InvalidInput(
            f"snapshot {snap_id} labels {list(hold_a.classes)}, but v{a.version} predicts "
            f"{list(a.classes)}; compare on a snapshot with the models' classes"
        )

    # an INT8 variant runs on ONNX Runtime only: then both are timed there (when they can be)
    onnx = requires_onnxruntime(la.manifest) or requires_onnxruntime(lb.manifest)

    def meta(row: ModelVersion, loaded: Any) -> dict[str, Any]:
        return {
            "size_bytes": row.size_bytes,
            "latency_ms": served_latency_ms(loaded, onnx=onnx),
        }

    meta_a, meta_b = meta(a, la), meta(b, lb)
    report = compare(
        hold_a.labels,
        served_proba(la, hold_a.images),  # an INT8 variant is scored on its INT8 graph
        served_proba(lb, hold_b.images),
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
            "quantization": v.manifest.get("metrics", {}).get("quantization"),
        }
        for v in session.scalars(
            select(ModelVersion).where(
                ModelVersion.project_id == row.project_id, ModelVersion.parent_version_id == row.id
            )
        )
    ]
    int8 = row.manifest.get("metrics", {}).get("quantization")
    return {
        "candidate_is_pruned": own is not None,
        "candidate": own,
        "candidate_is_int8": int8 is not None,
        "candidate_quantization": int8,  # fp32 vs INT8 on the hold-out, same runtime
        "variants": variants,
    }


def propose(
    *,
    session: Session,
    storage: Storage,
    ref: str | int | ModelVersion,
    cache_root: str | Path,
    config: PolicyConfig | None = None,
    snapshot_id: int | None = None,
    project_id: int = DEFAULT_PROJECT_ID,
) -> Proposal:
    """Compare a candidate with the project's champion and judge it (no state changes)."""
    config = config or PolicyConfig()
    cand = get_version(session=session, ref=ref, project_id=project_id)
    champ = alias_of(session=session, alias=CHAMPION, project_id=project_id)
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
            project_id=project_id,
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

"""Comparing two detector versions and judging a candidate: the detection side of
``registry.compare_versions`` and ``registry.evaluate_policy``.

Both versions detect on the same hold-out images (the project's newest snapshot's, which
keeps the seed's fixed hold-out); the report (``detection.compare.compare_detectors``) gives
mAP, mAP@0.5, mAP@0.75, by size and per class side by side, the mAP difference with a paired
bootstrap CI over images, the precision-recall curves, and the images where the two disagree
most. The policy reads the CI:

* ``map``: fails only when the candidate is significantly worse (the CI lies below 0 and
  below ``-map_margin``); passes as "significantly better" when the CI lies above 0, and says
  whether non-inferiority within the margin is shown otherwise;
* ``class_ap``: fails when a class's AP drops by more than ``max_class_ap_drop`` while the mAP
  CI does not show an improvement (a bootstrap per class would need far more images);
* ``power``: always passes; states the hold-out size and the CI's width."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from quarkflow_core.schema import DEFAULT_PROJECT_ID, ModelVersion, Split
from quarkflow_core.storage import Storage

MAP_MARGIN = 0.01
MAX_CLASS_AP_DROP = 0.10
REPORT_FORMAT = "detection-1"


def is_detector(row: ModelVersion) -> bool:
    return (row.manifest or {}).get("task") == "detection"


def compare_detector_versions(
    *,
    session: Session,
    storage: Storage,
    a: ModelVersion,
    b: ModelVersion,
    cache_root: str | Path,
    snapshot_id: int,
    alpha: float = 0.05,
    project_id: int = DEFAULT_PROJECT_ID,
) -> dict[str, Any]:
    """B against A on the snapshot's hold-out (uncached; ``registry.compare_versions`` caches)."""
    from quarkflow_core.detection.compare import compare_detectors
    from quarkflow_core.detection.snapshots import load_detection_snapshot
    from quarkflow_core.detection.train import detect
    from quarkflow_core.registry.versions import load_version

    hold = load_detection_snapshot(
        session=session,
        storage=storage,
        snapshot_id=snapshot_id,
        splits=(Split.HOLDOUT,),
        project_id=project_id,
    ).get(Split.HOLDOUT)
    if hold is None:
        from quarkflow_core.errors import NotFound

        raise NotFound(f"snapshot {snapshot_id} has no hold-out split")
    la = load_version(storage=storage, row=a, cache_root=cache_root)
    lb = load_version(storage=storage, row=b, cache_root=cache_root)
    truths = [{"boxes": bx, "labels": lab} for bx, lab in zip(hold.boxes, hold.labels, strict=True)]
    from quarkflow_core.detection.training import EVAL_FLOOR

    report = compare_detectors(
        detect(la.model, hold.images, score_floor=EVAL_FLOOR),
        detect(lb.model, hold.images, score_floor=EVAL_FLOOR),
        truths,
        list(hold.classes),
        confidence=1 - alpha,
        score_threshold_a=la.score_threshold,
        score_threshold_b=lb.score_threshold,
    )
    from quarkflow_core.detection.training import latency_ms

    report.update(
        {
            "task": "detection",
            "report_format": REPORT_FORMAT,
            "alpha": alpha,
            "a": {"version": a.version, "sha256": a.sha256},
            "b": {"version": b.version, "sha256": b.sha256},
            "snapshot_id": snapshot_id,
            "holdout_image_ids": list(hold.ids or []),  # disagreements index into this
            "meta_a": {
                "size_bytes": a.size_bytes,
                "latency_ms": latency_ms(la.model, hold.images[0]),
            },
            "meta_b": {
                "size_bytes": b.size_bytes,
                "latency_ms": latency_ms(lb.model, hold.images[0]),
            },
        }
    )
    return report


def detection_policy(report: dict[str, Any], config: Any) -> Any:
    """Judge a detector comparison (A = champion, B = candidate); advises, never promotes."""
    from quarkflow_core.registry.policy import PolicyVerdict

    margin = float(getattr(config, "map_margin", MAP_MARGIN))
    limit = float(getattr(config, "max_class_ap_drop", MAX_CLASS_AP_DROP))
    d, lo, hi = report["diff"], report["ci_low"], report["ci_high"]
    if d is None or lo is None or hi is None:  # no true box on the hold-out
        return PolicyVerdict(
            False, "fail", ["the hold-out has no boxes to compare the versions on"], [], {}
        )
    level = report.get("confidence", 0.95)
    stats = (
        f"mAP {report['map_a']:.3f} -> {report['map_b']:.3f} ({d:+.3f}, {level:.0%} paired "
        f"bootstrap CI over {report['n_images']} images [{lo:+.3f}, {hi:+.3f}])"
    )
    checks = []
    if lo > 0:
        checks.append({"name": "map", "passed": True, "detail": f"significantly better: {stats}"})
    elif hi < 0 and hi < -margin:
        checks.append({"name": "map", "passed": False, "detail": f"significantly worse: {stats}"})
    elif lo >= -margin:
        checks.append(
            {
                "name": "map",
                "passed": True,
                "detail": f"non-inferior within the -{margin:.3f} margin: {stats}",
            }
        )
    else:
        checks.append(
            {
                "name": "map",
                "passed": True,
                "detail": (
                    f"not significantly different: {stats}; non-inferiority within "
                    f"-{margin:.3f} is not shown at this hold-out size"
                ),
            }
        )
    per_class = report["per_class"]
    changes = {c: m["ap_diff"] for c, m in per_class.items() if m["ap_diff"] is not None}
    drops = {c: v for c, v in changes.items() if v < -limit}
    if drops and lo <= 0:
        listed = ", ".join(f"{c} ({v:+.3f})" for c, v in sorted(drops.items(), key=lambda x: x[1]))
        checks.append(
            {
                "name": "class_ap",
                "passed": False,
                "detail": f"AP drops by more than {limit:.2f} for class {listed}, and the mAP "
                "gain is not significant",
            }
        )
    else:
        worst = min(changes.items(), key=lambda x: x[1], default=None)
        shown = f"; largest change {worst[0]} {worst[1]:+.3f}" if worst else ""
        checks.append(
            {
                "name": "class_ap",
                "passed": True,
                "detail": f"no class AP drops by more than {limit:.2f} unexplained{shown}",
            }
        )
    width = hi - lo
    power = {"n_images": report["n_images"], "ci_width": round(width, 4), "margin": margin}
    checks.append(
        {
            "name": "power",
            "passed": True,
            "detail": f"{report['n_images']} hold-out images: the mAP difference's CI is "
            f"{width:.3f} wide, so differences under about {width / 2:.3f} are not resolved",
        }
    )
    passed = all(c["passed"] for c in checks)
    reasons = [c["detail"] for c in checks if not c["passed"]] or [c["detail"] for c in checks]
    return PolicyVerdict(passed, "pass" if passed else "fail", reasons, checks, power)

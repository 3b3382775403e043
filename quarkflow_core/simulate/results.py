"""What a simulation leaves: the summary per strategy, result files the workbench reads, and
the curves (flat rows, bands over seeds) for tables and plots."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np


def _mean_accuracy(run: dict[str, Any]) -> float:
    return float(np.mean([row["accuracy"] for row in run["rounds"]]))


def summarize_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per strategy, ranges over seeds: answered labels to reach random's final accuracy
    (or the weakest strategy's when random was not run), final accuracy, mean accuracy over
    the rounds (area under the curve)."""
    by: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        by.setdefault(run["strategy"], []).append(run)
    base = (
        "random"
        if "random" in by
        else min(by, key=lambda k: np.mean([r["rounds"][-1]["accuracy"] for r in by[k]]))
    )
    target = float(np.mean([r["rounds"][-1]["accuracy"] for r in by[base]]))

    def stats(values: list[float | None]) -> dict[str, Any]:
        known = [v for v in values if v is not None]
        return {
            "mean": float(np.mean(known)) if known else None,
            "min": min(known) if known else None,
            "max": max(known) if known else None,
            "reached": f"{len(known)}/{len(values)}",
        }

    out: dict[str, Any] = {"target_accuracy": target, "target_from": base, "strategies": {}}
    for name, rs in by.items():
        to_target = [
            next((row["answered"] for row in r["rounds"] if row["accuracy"] >= target), None)
            for r in rs
        ]
        out["strategies"][name] = {
            "seeds": [r["seed"] for r in rs],
            "answered_to_target": stats(to_target),
            "final_accuracy": stats([r["rounds"][-1]["accuracy"] for r in rs]),
            "mean_accuracy": stats(
                [float(np.mean([x["accuracy"] for x in r["rounds"]])) for r in rs]
            ),
        }
    return out


def save_result(result: dict[str, Any], folder: str | Path) -> Path:
    """Write a result where the workbench finds it (``<data dir>/simulations``)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"simulation-{datetime.now(UTC):%Y%m%d-%H%M%S}.json"
    path.write_text(json.dumps(result, indent=1))
    return path


def load_results(folders: Sequence[str | Path]) -> list[tuple[Path, dict[str, Any]]]:
    """Saved results (newest first) from these folders; unreadable files are skipped."""
    found = []
    for folder in folders:
        for path in Path(folder).glob("*.json"):
            try:
                result = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if isinstance(result, dict) and "runs" in result and "summary" in result:
                found.append((path, result))
    return sorted(found, key=lambda pr: pr[1].get("created_at", ""), reverse=True)


def curve_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Flat rows (strategy, seed, round, answered, accuracy, ...) for tables and plots."""
    return [
        {"strategy": run["strategy"], "seed": run["seed"], **row}
        for run in result["runs"]
        for row in run["rounds"]
    ]


def curve_bands(result: dict[str, Any], metric: str = "accuracy") -> list[dict[str, Any]]:
    """Per strategy and number of answered labels: mean, min and max of ``metric`` over the
    seeds (the band a plot draws)."""
    groups: dict[tuple[str, int], list[float]] = {}
    for row in curve_rows(result):
        groups.setdefault((row["strategy"], row["answered"]), []).append(float(row[metric]))
    return [
        {
            "strategy": strategy,
            "answered": answered,
            "mean": float(np.mean(v)),
            "min": min(v),
            "max": max(v),
            "seeds": len(v),
        }
        for (strategy, answered), v in sorted(groups.items())
    ]

"""Label efficiency of the review queue on the demo digits: `quarkflow simulate-loop` with
``random`` (the reference, measured in the same run) against the queue's default strategy
(QF_REVIEW_STRATEGY's default) and plain ``uncertainty``, over three seeds.

Writes bench/results/simulate_loop.json (the full curves: the workbench's Loop simulator page
plots this file too) and prints, per strategy, the answered labels needed to reach random's
final test accuracy and the ratio to random's, with ranges over the seeds."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

from quarkflow_core.config import Settings
from quarkflow_core.simulate import LabelledData, SimulationSpec, simulate_loop

RESULTS = Path(__file__).parent / "results" / "simulate_loop.json"
SEEDS = (0, 1, 2)


def spec() -> SimulationSpec:
    default = Settings.model_fields["review_strategy"].default
    strategies = ("random", default) + (("uncertainty",) if default != "uncertainty" else ())
    return SimulationSpec(
        seed_size=int(os.environ.get("QF_BENCH_SIM_SEED_SIZE", 200)),
        pool_size=2000,
        test_size=1500,
        rounds=int(os.environ.get("QF_BENCH_SIM_ROUNDS", 6)),
        per_round=50,
        strategies=strategies,
        seeds=SEEDS,
        epochs=15,
    )


def main() -> None:
    s = spec()
    started = time.perf_counter()

    def on_round(row: dict) -> None:
        print(
            f"  {row['strategy']:<11} seed {row['seed']} round {row['round']}: "
            f"{row['answered']:>3} answered, test accuracy {row['accuracy']:.1%} "
            f"(candidate {row['candidate_accuracy']:.1%}, policy {row['policy']}) "
            f"{row['seconds']:.0f}s",
            flush=True,
        )

    result = simulate_loop(LabelledData.demo(), s, on_round=on_round)
    summary = result["summary"]
    base = summary["strategies"]["random"]
    ratios = {}
    for name, st in summary["strategies"].items():
        per_seed = []
        for run_seed in SEEDS:
            mine = _answered(result, name, run_seed, summary["target_accuracy"])
            ref = _answered(result, "random", run_seed, summary["target_accuracy"])
            per_seed.append(None if mine is None or ref is None else mine / ref)
        known = [r for r in per_seed if r is not None]
        ratios[name] = {
            "answered_ratio_to_random_per_seed": per_seed,
            "mean": sum(known) / len(known) if known else None,
            "min": min(known) if known else None,
            "max": max(known) if known else None,
        }
        reach = st["answered_to_target"]
        print(
            f"{name:<11} answered to {summary['target_accuracy']:.1%}: "
            f"{reach['mean']} [{reach['min']}-{reach['max']}] ({reach['reached']} seeds); "
            f"final {st['final_accuracy']['mean']:.1%}; ratio to random {ratios[name]['mean']}"
        )
    result["ratios_to_random"] = ratios
    result["reference"] = {"strategy": "random", "answered_to_target": base["answered_to_target"]}
    result["machine"] = {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "load_avg_1m": os.getloadavg()[0],
        "wall_s": round(time.perf_counter() - started, 1),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1))
    print(f"wrote {RESULTS}")


def _answered(result: dict, strategy: str, seed: int, target: float) -> int | None:
    for run in result["runs"]:
        if run["strategy"] == strategy and run["seed"] == seed:
            return next((r["answered"] for r in run["rounds"] if r["accuracy"] >= target), None)
    return None


if __name__ == "__main__":
    main()

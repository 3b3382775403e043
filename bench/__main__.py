"""Run every benchmark module listed in BENCHMARKS; each writes bench/results/<name>.json."""

import importlib
import sys

BENCHMARKS: list[str] = [
    "bench_train",
    "bench_ml_speed",
    "bench_quantize",
    "bench_serving",
    "bench_serving_peers",
    "bench_workbench",
    "bench_simulate",
    "bench_detection",
    "bench_gpu",
]


def main(argv: list[str]) -> int:
    names = argv or BENCHMARKS
    if not names:
        print("no benchmarks registered yet")
        return 0
    for name in names:
        print(f"== bench.{name}")
        importlib.import_module(f"bench.{name}").main()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

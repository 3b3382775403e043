"""CPU speed of pruning and export, measured on this machine in one run.

(a) structured pruning trade-off: resnet18 at 224 (random init: latency does not depend on the
    weights) at 0/30/50% channels, and smallcnn trained on sklearn digits (accuracy before,
    right after pruning, after BN recalibration, after recovery fine-tuning);
(b) eager vs TorchScript vs onnxruntime for resnet18 at 224.

Latencies are medians of interleaved rounds (every variant timed once per round) so that load
from other processes on a shared machine hits all variants alike; the load average is recorded.
Writes bench/results/ml_speed.json and prints a summary table."""

from __future__ import annotations

import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

RESULTS = Path(__file__).parent / "results" / "ml_speed.json"
RATIOS = (0.3, 0.5)
ROUNDS = 5
REPEATS = {1: 10, 32: 2}  # per round; batch 32 of resnet18 costs ~0.5 s per call on 2 cores
WARMUP = {1: 5, 32: 1}


def _photos(preset) -> torch.Tensor:
    """Four real photographs shipped with scikit-image, uint8 NCHW at the preset size."""
    import skimage.data
    from PIL import Image

    arrays = [
        preset.to_array(Image.fromarray(getattr(skimage.data, name)()))
        for name in ("astronaut", "coffee", "chelsea", "rocket")
    ]
    return torch.from_numpy(np.stack(arrays).transpose(0, 3, 1, 2).copy())


def _interleaved_latency(
    variants: dict[str, Callable[[Any], Any]], inputs: dict[int, Any]
) -> dict[str, dict[int, float]]:
    """{variant: {batch: median ms}}: each round times every variant; median over rounds."""
    from quarkflow_core.ml.engine import median_latency_ms

    samples: dict[str, dict[int, list[float]]] = {v: {} for v in variants}
    with torch.inference_mode():
        for _ in range(ROUNDS):
            for name, fn in variants.items():
                for bs, x in inputs.items():
                    ms = median_latency_ms(fn, x, repeats=REPEATS[bs], warmup=WARMUP[bs])
                    samples[name].setdefault(bs, []).append(ms)
    return {
        name: {bs: statistics.median(v) for bs, v in per.items()} for name, per in samples.items()
    }


def _resnet18_pruning(preset, photos: torch.Tensor) -> tuple[dict, dict[str, nn.Module]]:
    from quarkflow_core.ml.models import get_model
    from quarkflow_core.ml.prune import batch_of, measure, prune_structured

    torch.manual_seed(0)
    base = get_model("resnet18", num_classes=10).eval()
    example = preset.normalize(photos[:1])
    models = {"unpruned": base}
    ratios = {"unpruned": 0.0}
    for ratio in RATIOS:
        name = f"pruned{round(ratio * 100)}"
        models[name] = prune_structured(base, example, ratio=ratio).eval()
        ratios[name] = ratio
    x = {bs: preset.normalize(batch_of(photos, bs)) for bs in REPEATS}
    latency = _interleaved_latency(dict(models), x)
    rows = []
    for name, model in models.items():
        static = measure(model, preset, images_uint8=photos, labels=None, batch_sizes=())
        row = {
            "variant": name,
            "ratio": ratios[name],
            **{k: static[k] for k in ("macs", "params", "bytes")},
        }
        for bs in REPEATS:
            row[f"latency_ms_b{bs}"] = latency[name][bs]
            row[f"speedup_b{bs}"] = latency["unpruned"][bs] / latency[name][bs]
        rows.append(row)
    return {
        "arch": "resnet18",
        "input": "3x224x224",
        "weights": "random init",
        "rows": rows,
    }, models


def _smallcnn_pruning() -> dict:
    from quarkflow_core.ml.data import sklearn_digits, stratified_split
    from quarkflow_core.ml.engine import train_epochs
    from quarkflow_core.ml.models import get_model
    from quarkflow_core.ml.prune import (
        measure,
        prune_structured,
        prune_unstructured,
        recalibrate_bn,
        recover,
        weight_sparsity,
    )
    from quarkflow_core.ml.transforms import eval_preset

    preset = eval_preset("digits28")
    data = sklearn_digits(preset)
    train_idx, hold_idx = stratified_split(data.labels, fraction=0.25, seed=0)
    train, hold = data.subset(train_idx), data.subset(hold_idx)
    torch.manual_seed(0)
    model = get_model("smallcnn", num_classes=10, in_channels=1)
    cpu = torch.device("cpu")
    epochs = 3
    train_epochs(model, train, preset, epochs=epochs, lr=3e-3, batch_size=64, device=cpu)

    def stats(m: nn.Module) -> dict:
        return measure(
            m, preset, images_uint8=hold.images, labels=hold.labels, repeats=20, warmup=5
        )

    base = stats(model)
    rows = [
        {
            "variant": "unpruned",
            "ratio": 0.0,
            **base,
            "accuracy_pruned": None,
            "accuracy_recalibrated": None,
            "accuracy_recovered": base["accuracy"],
        }
    ]
    example = preset.normalize(hold.images[:1])
    for ratio in RATIOS:
        pruned = prune_structured(model, example, ratio=ratio).eval()
        raw = stats(pruned)["accuracy"]
        recalibrate_bn(pruned, train.images, preset)
        recal = stats(pruned)["accuracy"]
        recover(pruned, train, preset, epochs=2, batch_size=64, device=cpu)
        after = stats(pruned)
        rows.append(
            {
                "variant": f"pruned{round(ratio * 100)}",
                "ratio": ratio,
                **after,
                "accuracy_pruned": raw,
                "accuracy_recalibrated": recal,
                "accuracy_recovered": after["accuracy"],
            }
        )
    sparse = prune_unstructured(model, amount=0.5)
    unstructured = {
        "amount": 0.5,
        "sparsity": weight_sparsity(sparse),
        **stats(sparse),
        "note": "zeroed weights, dense tensors: same MACs, bytes and latency",
    }
    for row in rows:
        row.pop("accuracy", None)
    return {
        "arch": "smallcnn",
        "data": "sklearn digits 28x28, 75/25 split",
        "train_epochs": epochs,
        "recovery_epochs": 2,
        "holdout": len(hold),
        "structured": rows,
        "note": "recovery adds 2 training epochs to a 3-epoch model, so recovered pruned "
        "models may beat the unpruned one; compare at equal training budget before concluding",
        "unstructured": unstructured,
    }


def _backends(preset, photos: torch.Tensor, models: dict[str, nn.Module]) -> dict:
    from quarkflow_core.ml.export import export_onnx, export_torchscript, load_backend
    from quarkflow_core.ml.prune import batch_of

    base, pruned50 = models["unpruned"], models["pruned50"]
    example = preset.normalize(photos[:1])
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:
        ts_path = export_torchscript(
            base, example, Path(tmp) / "r18.pt", images_uint8=photos, preset=preset
        )
        onnx_path, _ = export_onnx(
            base, example, Path(tmp) / "r18.onnx", images_uint8=photos, preset=preset
        )
        pruned_path, _ = export_onnx(
            pruned50, example, Path(tmp) / "r18p50.onnx", images_uint8=photos, preset=preset
        )
        backends = {
            "eager": load_backend("eager", base),
            "torchscript": load_backend("torchscript", ts_path),
            "onnxruntime": load_backend("onnxruntime", onnx_path, threads=threads),
            "onnxruntime+pruned50": load_backend("onnxruntime", pruned_path, threads=threads),
        }
        x = {bs: preset.normalize(batch_of(photos, bs)) for bs in REPEATS}
        latency = _interleaved_latency({k: b.logits for k, b in backends.items()}, x)
    rows = []
    for name in backends:
        row = {"backend": name}
        for bs in REPEATS:
            row[f"latency_ms_b{bs}"] = latency[name][bs]
            row[f"vs_eager_b{bs}"] = latency["eager"][bs] / latency[name][bs]
        rows.append(row)
    return {"arch": "resnet18", "input": "3x224x224", "onnxruntime_threads": threads, "rows": rows}


def _print_summary(results: dict) -> None:
    r18 = results["resnet18_pruning"]["rows"]
    print(f"\nresnet18 @224, structured pruning (CPU, {results['env']['torch_threads']} threads)")
    print(
        f"{'variant':<11}{'MACs(G)':>9}{'params(M)':>11}{'MB':>7}{'b1 ms':>9}{'x':>6}"
        f"{'b32 ms':>9}{'x':>6}"
    )
    for r in r18:
        print(
            f"{r['variant']:<11}{r['macs'] / 1e9:>9.3f}{r['params'] / 1e6:>11.2f}"
            f"{r['bytes'] / 2**20:>7.1f}{r['latency_ms_b1']:>9.1f}{r['speedup_b1']:>6.2f}"
            f"{r['latency_ms_b32']:>9.1f}{r['speedup_b32']:>6.2f}"
        )
    sc = results["smallcnn_pruning"]
    print(f"\nsmallcnn on sklearn digits (holdout {sc['holdout']}): accuracy")
    print(
        f"{'variant':<11}{'params':>9}{'MACs(M)':>9}{'pruned':>8}{'BN-recal':>10}"
        f"{'recovered':>11}{'b1 ms':>8}{'b32 ms':>8}"
    )

    def fmt(v: float | None) -> str:
        return "-" if v is None else f"{v:.3f}"

    for r in sc["structured"]:
        print(
            f"{r['variant']:<11}{r['params']:>9}{r['macs'] / 1e6:>9.2f}"
            f"{fmt(r['accuracy_pruned']):>8}{fmt(r['accuracy_recalibrated']):>10}"
            f"{fmt(r['accuracy_recovered']):>11}{r['latency_ms_b1']:>8.2f}"
            f"{r['latency_ms_b32']:>8.2f}"
        )
    u = sc["unstructured"]
    print(
        f"unstructured 50%: sparsity {u['sparsity']:.3f}, accuracy {u['accuracy']:.3f}, "
        f"b1 {u['latency_ms_b1']:.2f} ms, b32 {u['latency_ms_b32']:.2f} ms (no speed-up)"
    )
    print("\nresnet18 @224, backends")
    print(f"{'backend':<22}{'b1 ms':>9}{'vs eager':>10}{'b32 ms':>9}{'vs eager':>10}")
    for r in results["backends"]["rows"]:
        print(
            f"{r['backend']:<22}{r['latency_ms_b1']:>9.1f}{r['vs_eager_b1']:>10.2f}"
            f"{r['latency_ms_b32']:>9.1f}{r['vs_eager_b32']:>10.2f}"
        )
    print("\ntargets")
    for name, t in results["targets"].items():
        print(
            f"  {name}: {t['value']:.2f}x (target {t['target']}x) -> "
            f"{'met' if t['met'] else 'MISSED'}"
        )
    print(
        f"load average before/after: {results['env']['loadavg_before']} / "
        f"{results['env']['loadavg_after']}; total {results['env']['seconds']:.0f} s"
    )


def main() -> dict:
    import onnxruntime

    from quarkflow_core.ml.transforms import eval_preset

    start = time.perf_counter()
    load_before = [round(v, 2) for v in os.getloadavg()]
    preset = eval_preset("imagenet224")
    photos = _photos(preset)
    r18, models = _resnet18_pruning(preset, photos)
    backends = _backends(preset, photos, models)
    smallcnn = _smallcnn_pruning()
    p50 = next(r for r in r18["rows"] if r["variant"] == "pruned50")
    ort_row = next(r for r in backends["rows"] if r["backend"] == "onnxruntime")
    targets = {
        "resnet18_pruned50_speedup_b1": {"value": p50["speedup_b1"], "target": 2.0},
        "resnet18_onnxruntime_vs_eager_b1": {"value": ort_row["vs_eager_b1"], "target": 2.0},
    }
    for t in targets.values():
        t["met"] = t["value"] >= t["target"]
    results = {
        "env": {
            "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__,
            "python": platform.python_version(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "rounds": ROUNDS,
            "repeats_per_round": REPEATS,
            "loadavg_before": load_before,
            "loadavg_after": [round(v, 2) for v in os.getloadavg()],
            "seconds": time.perf_counter() - start,
        },
        "resnet18_pruning": r18,
        "backends": backends,
        "smallcnn_pruning": smallcnn,
        "targets": targets,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2))
    _print_summary(results)
    print(f"wrote {RESULTS}")
    return results


if __name__ == "__main__":
    main()

"""INT8 (ONNX Runtime static quantization, QDQ, per-channel weights) against fp32, both under
ONNX Runtime with the same thread count, measured in one run:

(a) resnet18 at 224 (random init: latency and size do not depend on the weights), calibrated on
    real photographs: file size, batch-1 latency and batch-32 throughput;
(b) the demo model (smallcnn, the default `make demo` training config, on the 4,000 MNIST
    training digits) quantized by the product's own ``quantize_artifact``: hold-out accuracy
    fp32 vs INT8 on the 1,000 hold-out digits, top-1 agreement, max |Δ prob|, size, latency.

Latencies are medians over interleaved rounds (fp32 and INT8 take turns call by call, so load
from other processes on the shared CPU hits both alike); ranges are the min-max of the rounds'
medians. Writes bench/results/quantize.json and prints a summary."""

from __future__ import annotations

import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).parent / "results" / "quantize.json"
THREADS = 2
ROUNDS = 5
REPEATS = {1: 20, 32: 3}  # per round and model


def _rounds(sessions: dict[str, Any], images, preset) -> dict[str, Any]:
    """Per batch size: each model's median ms over ROUNDS rounds, the rounds' range, and the
    INT8 speed-up (fp32 ms / INT8 ms) per round."""
    from quarkflow_core.ml.quantize import paired_latency

    out: dict[str, Any] = {}
    for bs, repeats in REPEATS.items():
        per: dict[str, list[float]] = {name: [] for name in sessions}
        for _ in range(ROUNDS):
            lat = paired_latency(sessions, images, preset, batch_size=bs, repeats=repeats)
            for name in sessions:
                per[name].append(lat[name]["median_ms"])
        speedups = [a / b for a, b in zip(per["fp32"], per["int8"], strict=True)]
        out[f"b{bs}"] = {
            **{
                name: {
                    "median_ms": statistics.median(v),
                    "range_ms": [min(v), max(v)],
                    "images_per_s": 1000.0 * bs / statistics.median(v),
                }
                for name, v in per.items()
            },
            "speedup": statistics.median(speedups),
            "speedup_range": [min(speedups), max(speedups)],
        }
    return out


def _resnet18(tmp: Path) -> dict[str, Any]:
    from bench.bench_ml_speed import _photos
    from quarkflow_core.ml.data import ImageSet
    from quarkflow_core.ml.export import export_onnx
    from quarkflow_core.ml.models import get_model
    from quarkflow_core.ml.quantize import files_bytes, quantize_onnx, session
    from quarkflow_core.ml.transforms import eval_preset

    preset = eval_preset("imagenet224")
    photos = _photos(preset)
    torch.manual_seed(0)
    model = get_model("resnet18", num_classes=10).eval()
    fp32 = export_onnx(
        model, preset.normalize(photos[:1]), tmp / "r18.onnx", images_uint8=photos, preset=preset
    )
    calib = photos[torch.arange(32) % photos.shape[0]]
    flipped = torch.flip(calib[16:], dims=[3])  # some variety for the activation ranges
    calib = torch.cat([calib[:16], flipped])
    t0 = time.perf_counter()
    recipe = quantize_onnx(
        fp32[0],
        tmp / "r18-int8.onnx",
        calibration=ImageSet(calib, torch.zeros(32, dtype=torch.long), ["x"], [""] * 32),
        preset=preset,
        work_dir=tmp / "r18-work",
    )
    seconds = time.perf_counter() - t0
    sessions = {
        "fp32": session(fp32[0], threads=THREADS),
        "int8": session(tmp / "r18-int8.onnx", threads=THREADS),
    }
    bytes32, bytes8 = files_bytes(fp32), (tmp / "r18-int8.onnx").stat().st_size
    return {
        "arch": "resnet18",
        "input": "3x224x224",
        "weights": "random init",
        "calibration": "32 crops of 4 scikit-image photographs (half mirrored)",
        "recipe": recipe,
        "quantize_seconds": seconds,
        "bytes_fp32": bytes32,
        "bytes_int8": bytes8,
        "size_ratio": bytes8 / bytes32,
        "latency": _rounds(sessions, photos, preset),
    }


def _demo_model(tmp: Path) -> dict[str, Any]:
    from bench.bench_train import demo_sets
    from quarkflow_core.ml.artifacts import load_artifact, save_artifact
    from quarkflow_core.ml.quantize import session
    from quarkflow_core.ml.train import TrainConfig, fit
    from quarkflow_core.ml.variants import quantize_artifact

    train, hold = demo_sets()
    t0 = time.perf_counter()
    res = fit(train, TrainConfig(num_threads=THREADS))
    train_s = time.perf_counter() - t0
    save_artifact(
        tmp / "fp32",
        model=res.model,
        architecture="smallcnn",
        classes=res.classes,
        in_channels=1,
        preset=res.preset,
    )
    t0 = time.perf_counter()
    evidence, _ = quantize_artifact(
        load_artifact(tmp / "fp32"), train=train, holdout=hold, out_dir=tmp / "int8"
    )
    quantize_s = time.perf_counter() - t0
    # the latency again, in rounds, for a range (the evidence above is one measurement);
    # fp32 from an export made the same way quantize_artifact makes it
    from quarkflow_core.ml.export import export_onnx

    fp32 = export_onnx(
        res.model,
        res.preset.normalize(hold.images[:1]),
        tmp / "fp32-onnx" / "model.onnx",
        images_uint8=hold.images[:64],
        preset=res.preset,
    )
    sessions = {
        "fp32": session(fp32[0], threads=THREADS),
        "int8": session(tmp / "int8" / "model.onnx", threads=THREADS),
    }
    return {
        "arch": "smallcnn",
        "data": f"MNIST demo digits: {len(train)} train, {len(hold)} hold-out",
        "train_seconds": train_s,
        "quantize_seconds": quantize_s,
        "evidence": evidence,
        "latency": _rounds(sessions, hold.images, res.preset),
    }


def _print_summary(results: dict) -> None:
    def lat(block: dict) -> str:
        b1, b32 = block["b1"], block["b32"]
        return (
            f"batch 1 {b1['fp32']['median_ms']:.2f} -> {b1['int8']['median_ms']:.2f} ms "
            f"(x{b1['speedup']:.2f}, rounds {b1['speedup_range'][0]:.2f}-"
            f"{b1['speedup_range'][1]:.2f}); batch 32 {b32['fp32']['images_per_s']:,.0f} -> "
            f"{b32['int8']['images_per_s']:,.0f} img/s (x{b32['speedup']:.2f}, rounds "
            f"{b32['speedup_range'][0]:.2f}-{b32['speedup_range'][1]:.2f})"
        )

    r = results["resnet18"]
    print(f"\nresnet18 @224, fp32 vs INT8 under ONNX Runtime ({THREADS} threads)")
    mb32, mb8 = r["bytes_fp32"] / 1e6, r["bytes_int8"] / 1e6
    print(f"  size {mb32:.1f} -> {mb8:.1f} MB (x{r['size_ratio']:.3f})")
    print(f"  {lat(r['latency'])}")
    d = results["demo_model"]
    e = d["evidence"]
    print(f"\nsmallcnn demo model ({d['data']})")
    print(
        f"  accuracy {e['accuracy_fp32']:.4f} -> {e['accuracy_int8']:.4f} "
        f"({e['accuracy_loss_points']:+.2f} points lost), agreement {e['agreement']:.4f}, "
        f"max |dp| {e['max_abs_prob_diff']:.4f}"
    )
    print(f"  size {e['bytes_fp32']:,} -> {e['bytes_int8']:,} B (x{e['size_ratio']:.3f})")
    print(f"  {lat(d['latency'])}")
    env = results["env"]
    print(
        f"load average before/after: {env['loadavg_before']} / {env['loadavg_after']}; "
        f"total {env['seconds']:.0f} s"
    )


def main() -> dict:
    import onnxruntime

    start = time.perf_counter()
    load_before = [round(v, 2) for v in os.getloadavg()]
    torch.set_num_threads(THREADS)
    with tempfile.TemporaryDirectory() as tmp:
        r18 = _resnet18(Path(tmp))
        demo = _demo_model(Path(tmp))
    results = {
        "env": {
            "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__,
            "python": platform.python_version(),
            "cpu_count": os.cpu_count(),
            "threads": THREADS,
            "rounds": ROUNDS,
            "repeats_per_round": REPEATS,
            "loadavg_before": load_before,
            "loadavg_after": [round(v, 2) for v in os.getloadavg()],
            "seconds": time.perf_counter() - start,
            "notes": "2-core machine shared with other work while measuring: absolute times "
            "vary run to run; fp32 and INT8 take turns call by call, so their ratio is the "
            "steadier figure",
        },
        "resnet18": r18,
        "demo_model": demo,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2))
    _print_summary(results)
    print(f"wrote {RESULTS}")
    return results


if __name__ == "__main__":
    main()

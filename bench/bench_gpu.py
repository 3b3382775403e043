"""The GPU figures, in one prepared script for a lent GPU machine (``python -m bench bench_gpu``;
it writes ``bench/results/gpu.json``). On a machine without CUDA it writes nothing and says so,
unless ``QF_BENCH_GPU_DRY_RUN=1``: then it runs every part on the CPU with tiny sizes, only to
show the script works (its figures mean nothing and go to ``bench/results/gpu-dry-run.json``).

1. **Serving inference**: resnet18 at 224 px (random init: speed does not depend on the
   weights) through the serving backend (``ml.backends.TorchDeviceBackend``: uint8 to the
   device, normalized there, channels-last) in fp16 autocast and fp32, batch 1 / 8 / 32 / 128:
   img/s and p50 ms per batch. The reference measured in the same run: ONNX Runtime's CPU
   provider at batch 32 (what serving uses without a GPU).
2. **Serving under concurrency**: the ``Predictor`` + ``MicroBatcher`` with the GPU's batching
   (``ml.backends.GPU_BATCHING``), 1 / 16 / 64 concurrent submitters: img/s and p50 latency.
3. **Training with AMP**: ``fit`` vs a bare AMP loop on the same GPU (resnet18, 64 px, same data,
   batch size, epochs).
4. **Detector training**: ``bench_detection``'s fit_detector vs bare torchvision loop, on the
   GPU.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

RESULTS = Path(__file__).parent / "results"
DRY = os.environ.get("QF_BENCH_GPU_DRY_RUN") == "1"


def _p50_ms(times: list[float]) -> float:
    return round(statistics.median(times) * 1000, 3)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _resnet(num_classes: int = 10) -> nn.Module:
    from torchvision.models import resnet18

    return resnet18(num_classes=num_classes).eval()


def inference(device: torch.device, *, size: int, batches: list[int], seconds: float) -> dict:
    from quarkflow_core.ml.backends import TorchDeviceBackend
    from quarkflow_core.ml.transforms import PRESETS

    preset = PRESETS["imagenet224"]
    model = _resnet()
    out: dict[str, Any] = {}
    for label, half in (("fp16_autocast", True), ("fp32", False)):
        backend = TorchDeviceBackend(
            model, device=str(device), half=half, example_shape=(1, 3, size, size)
        )
        rows = {}
        for n in batches:
            x = np.random.default_rng(0).integers(0, 255, (n, 3, size, size), dtype=np.uint8)
            for _ in range(3):
                backend.logits_uint8(x, preset.normalize)
            times: list[float] = []
            t_end = time.perf_counter() + seconds
            while time.perf_counter() < t_end or len(times) < 5:
                t0 = time.perf_counter()
                backend.logits_uint8(x, preset.normalize)  # returns numpy: synchronized
                times.append(time.perf_counter() - t0)
            rows[str(n)] = {
                "img_s": round(n * len(times) / sum(times), 1),
                "p50_ms_per_batch": _p50_ms(times),
            }
        out[label] = rows
    # the reference: ONNX Runtime's CPU provider at batch 32 (2 threads), what serves without
    from quarkflow_core.ml.export import OnnxRuntimeBackend

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.onnx"
        torch.onnx.export(
            model.cpu(),
            torch.zeros(1, 3, size, size),
            str(path),
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "n"}},
            dynamo=False,
        )
        ort = OnnxRuntimeBackend(path, threads=2)
        n = 32 if not DRY else 2
        x = preset.normalize(torch.zeros(n, 3, size, size, dtype=torch.uint8)).numpy()
        ort.logits(x)
        times = []
        t_end = time.perf_counter() + seconds
        while time.perf_counter() < t_end or len(times) < 3:
            t0 = time.perf_counter()
            ort.logits(x)
            times.append(time.perf_counter() - t0)
        out["onnxruntime_cpu_2_threads"] = {
            str(n): {
                "img_s": round(n * len(times) / sum(times), 1),
                "p50_ms_per_batch": _p50_ms(times),
            }
        }
    best = max(out["fp16_autocast"].values(), key=lambda r: r["img_s"])["img_s"]
    out["best_gpu_vs_cpu_onnxruntime"] = round(
        best / out["onnxruntime_cpu_2_threads"][str(n)]["img_s"], 2
    )
    return out


def concurrency(device: torch.device, *, size: int, clients: list[int], seconds: float) -> dict:
    from quarkflow_core.ml.backends import GPU_BATCHING, TorchDeviceBackend
    from quarkflow_core.ml.transforms import PRESETS
    from quarkflow_core.predictor import MicroBatcher, Predictor

    preset = PRESETS["imagenet224"]
    backend = TorchDeviceBackend(
        _resnet(), device=str(device), half=device.type == "cuda", example_shape=(1, 3, size, size)
    )
    predictor = Predictor(
        version=1,
        sha256="bench",
        classes=[str(i) for i in range(10)],
        preset=preset,
        temperature=1.0,
        backend=backend,
        backend_name=backend.name,
        device=str(device),
    )
    x = np.zeros((3, size, size), dtype=np.uint8)
    out = {}
    for n in clients:
        batcher = MicroBatcher(max_batch=GPU_BATCHING[0], max_wait_ms=GPU_BATCHING[1])
        batcher.start()
        try:
            out[str(n)] = _load(batcher, predictor, x, clients=n, seconds=seconds)
        finally:
            batcher.stop()
    return out


def _load(batcher: Any, predictor: Any, x: np.ndarray, *, clients: int, seconds: float) -> dict:
    """``clients`` threads submitting one image at a time for ``seconds``."""
    latencies: list[float] = []
    lock = threading.Lock()
    stop = time.perf_counter() + seconds

    def client() -> None:
        while time.perf_counter() < stop:
            t0 = time.perf_counter()
            batcher.submit(x, predictor).result(timeout=60)
            with lock:
                latencies.append(time.perf_counter() - t0)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {"img_s": round(len(latencies) / wall, 1), "p50_ms": _p50_ms(latencies)}


def training(device: torch.device, *, n: int, size: int, epochs: int, batch: int) -> dict:
    from quarkflow_core.ml.data import ImageSet
    from quarkflow_core.ml.train import TrainConfig, fit

    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(0, 255, (n, 3, size, size), dtype=np.uint8))
    labels = torch.from_numpy(rng.integers(0, 10, n))
    data = ImageSet(images, labels, [str(i) for i in range(10)], [str(i) for i in range(n)])
    cfg = TrainConfig(
        architecture="resnet18",
        preset="small64",
        image_size=size,
        epochs=epochs,
        batch_size=batch,
        augment="none",
        patience=epochs,
        device=device.type,
    )
    fit(data.subset(np.arange(min(n, 4 * batch))), replace(cfg, epochs=1))  # pay imports once
    res = fit(data, cfg)
    seen = n - len(res.val)

    from quarkflow_core.ml.models import get_model
    from quarkflow_core.ml.transforms import PRESETS

    preset = PRESETS["small64"]
    torch.manual_seed(0)
    model = get_model("resnet18", num_classes=10, in_channels=3).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    scaler = torch.amp.GradScaler("cuda") if device.type == "cuda" else None
    loss_fn = nn.CrossEntropyLoss()
    x_all, y_all = images[:seen], labels[:seen]
    model.train()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(epochs):
        order = torch.randperm(seen)
        for s in range(0, seen, batch):
            idx = order[s : s + batch]
            x = preset.normalize(x_all[idx].to(device, non_blocking=True))
            y = y_all[idx].to(device, non_blocking=True)
            opt.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=torch.float16, enabled=scaler is not None):
                loss = loss_fn(model(x), y)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            else:
                loss.backward()
                opt.step()
    _sync(device)
    bare = seen * epochs / (time.perf_counter() - t0)
    return {
        "model": "resnet18 @ 64 px",
        "images": seen,
        "epochs": epochs,
        "batch_size": batch,
        "fit_img_s": round(res.images_per_second, 1),
        "bare_amp_loop_img_s": round(bare, 1),
        "fit_vs_bare": round(res.images_per_second / bare, 3),
        "fit_device": res.device,
    }


def main() -> dict | None:
    cuda = torch.cuda.is_available()
    if not cuda and not DRY:
        print("bench_gpu: no CUDA device here; nothing measured (QF_BENCH_GPU_DRY_RUN=1 tries it)")
        return None
    device = torch.device("cuda" if cuda else "cpu")
    size = 224 if not DRY else 64
    t0 = time.perf_counter()
    out: dict[str, Any] = {
        "machine": {
            "device": torch.cuda.get_device_name(0) if cuda else "cpu (dry run)",
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "platform": platform.platform(),
            "cpu_threads": torch.get_num_threads(),
        },
        "dry_run": DRY,
    }
    out["inference"] = inference(
        device,
        size=size,
        batches=[1, 8, 32, 128] if not DRY else [1, 2],
        seconds=3 if not DRY else 0.2,
    )
    print("inference", json.dumps(out["inference"]))
    out["serving_concurrency"] = concurrency(
        device, size=size, clients=[1, 16, 64] if not DRY else [1, 2], seconds=5 if not DRY else 0.5
    )
    print("concurrency", json.dumps(out["serving_concurrency"]))
    out["training_amp"] = training(
        device,
        n=6000 if not DRY else 64,
        size=64 if not DRY else 32,
        epochs=3 if not DRY else 1,
        batch=256 if not DRY else 16,
    )
    print("training", json.dumps(out["training_amp"]))
    if not DRY:
        from bench.bench_detection import _throughput

        out["detector_training"] = _throughput(device)
        print("detector", json.dumps(out["detector_training"]))
    out["wall_s"] = round(time.perf_counter() - t0, 1)
    target = RESULTS / ("gpu.json" if not DRY else "gpu-dry-run.json")
    target.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {target}")
    return out


if __name__ == "__main__":
    main()

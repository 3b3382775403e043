"""Object detection (issue 18), measured on this machine in one run:

(a) training throughput of ``fit_detector`` against ``bare_train_loop`` (torchvision's reference
    loop) on the same 48 small digits-on-photos images, same initial weights, data order, batch
    size and epochs; fit adds a one-cycle schedule, gradient clipping, per-epoch validation mAP
    and a checkpoint per epoch. Interleaved rounds (the order alternates) so that load from
    other processes on a shared machine hits both alike; median and range of the ratios;
(b) inference img/s at batch 1 of the demo detector at 320 px: eager ``detect`` against its
    ONNX export run by onnxruntime (``OnnxDetector``), interleaved rounds over the same hold-out
    images, plus the export's parity report and both backends' hold-out mAP;
(c) hold-out accuracy of the demo detector (``DetectorConfig(epochs=4)``, every other setting
    the architecture default: fasterrcnn_mnv2_fpn at 320 px) trained on 300 of
    ``digits_on_photos(400, seed=0)`` (the demo's sizes: 320 px images, digits of 12-180 px) and
    scored on the other 100, with 95% bootstrap intervals over hold-out images; and a one-class
    "Tree" detector trained briefly on ~400 px crops of deepforest's real aerial tiles, scored on
    the crops of a tile it never saw.

Training (c) takes ~4-5 minutes on 2 idle CPU cores (plus a few for the trees; two to three
times that on a busy machine). Trained detectors are cached as verified artifacts under
QF_BENCH_DET_CACHE (default: <tmp>/quarkflow-bench-detection; "off" disables), keyed by the
data, the config, torch's version and detection/{train,models,data}.py, so a rerun only
evaluates; their train seconds are those of the run that trained them. Environment knobs for a
quick look: QF_BENCH_DET_N (demo images, default 400), QF_BENCH_DET_TREE_EPOCHS (default 10),
QF_BENCH_DET_ROUNDS (timing rounds, default 5).

Writes bench/results/detection.json and prints a summary."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from quarkflow_core.detection.artifacts import load_detector_artifact, save_detector_artifact
from quarkflow_core.detection.data import DetectionSet, split_detection
from quarkflow_core.detection.synth import digits_on_photos
from quarkflow_core.detection.train import (
    DetectorConfig,
    bare_train_loop,
    detect,
    fit_detector,
)

RESULTS = Path(__file__).parent / "results" / "detection.json"
THREADS = 2  # the project machine's cores; set explicitly so runs are comparable
ROUNDS = int(os.environ.get("QF_BENCH_DET_ROUNDS", 5))
CLASSES = [str(d) for d in range(10)]
# the code a cached detector depends on (the data and the backbone weights are hashed as data)
CODE = [
    Path(__file__).parents[1] / "quarkflow_core" / "detection" / name
    for name in ("train.py", "models.py", "data.py")
]
_cache_env = os.environ.get("QF_BENCH_DET_CACHE", "")
CACHE = (
    None
    if _cache_env == "off"
    else Path(_cache_env or Path(tempfile.gettempdir()) / "quarkflow-bench-detection")
)

# (a) throughput: small enough for a few rounds in a couple of minutes
SPEED_N, SPEED_PX, SPEED_DIGIT_PX, SPEED_EPOCHS, SPEED_SEED = 48, 160, (16, 80), 2, 1

# (b) inference
INFER_IMAGES = 20  # hold-out images timed per round and variant
PARITY_IMAGES = 8  # hold-out images the export's parity check runs on

# (c) the demo recipe: what `quarkflow seed-demo` + `quarkflow train-detector` use
DEMO_N = int(os.environ.get("QF_BENCH_DET_N", 400))
DEMO_SEED, DEMO_PX, DEMO_HOLDOUT = 0, 320, 0.25
DEMO_DIGIT_PX = (12, min(180, DEMO_PX * 9 // 16))
EVAL_FLOOR = 0.01  # as training.EVAL_FLOOR: mAP needs the low-confidence tail
N_BOOT = 1000

# (c) trees
TREE_CROP = 400
TREE_MIN_VISIBLE = 0.5  # a box cut by the crop is kept when >= this share of its area is inside
TREE_HOLDOUT_TILE = "2019_YELL_2_541000_4977000_image_crop"
TREE_EPOCHS = int(os.environ.get("QF_BENCH_DET_TREE_EPOCHS", 10))


# --------------------------------------------------------------------------- helpers


def _span(values: list[float]) -> dict[str, float]:
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "runs": values,
    }


def _code_hash() -> str:
    h = hashlib.sha256()
    for path in CODE:
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def _data_hash(data: DetectionSet) -> str:
    h = hashlib.sha256()
    for img, boxes, labels in zip(data.images, data.boxes, data.labels, strict=True):
        h.update(np.ascontiguousarray(img).tobytes())
        h.update(boxes.tobytes())
        h.update(labels.tobytes())
    return h.hexdigest()


def _on_epoch(tag: str):
    def progress(ev) -> None:
        if ev.stage == "epoch":
            print(
                f"  {tag} epoch {ev.epoch}/{ev.epochs}: train loss {ev.train_loss:.3f}, "
                f"val mAP@0.5 {ev.val_map:.3f} ({ev.elapsed_s:.0f} s)",
                flush=True,
            )

    return progress


def _trained(tag: str, train: DetectionSet, cfg: DetectorConfig, device: torch.device):
    """(model, training record, cached?): a fitted detector, from the cache when the same data,
    config, torch and detection code trained one before. The score threshold is the best F1
    on fit's validation carve-out, as the training service picks it."""
    from quarkflow_core.detection.metrics import choose_threshold

    key = hashlib.sha256(
        json.dumps(
            {
                "config": cfg.resolved().to_dict(),
                "data": _data_hash(train),
                "torch": torch.__version__,
                "device": device.type,
                "code": _code_hash(),
            },
            sort_keys=True,
        ).encode()
    ).hexdigest()[:16]
    folder = CACHE / f"{tag}-{key}" if CACHE is not None else None
    if folder is not None and (folder / "manifest.json").is_file():
        loaded = load_detector_artifact(folder)
        print(f"  {tag}: cached artifact {folder}")
        return loaded.model.to(device), loaded.manifest["training"], True
    t0 = time.perf_counter()
    res = fit_detector(train, cfg, progress=_on_epoch(tag))
    wall = time.perf_counter() - t0
    val = res.val
    chosen = choose_threshold(detect(res.model, val.images, score_floor=EVAL_FLOOR), val.targets())
    record = {
        **res.summary(),
        "wall_seconds": wall,
        "train_images": len(train) - len(val),
        "val_images": len(val),
        "score_threshold": chosen["threshold"] if chosen["threshold"] is not None else 0.5,
        "history": res.history,
        "trained_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "loadavg_when_done": [round(v, 2) for v in os.getloadavg()],
    }
    if folder is not None:
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        save_detector_artifact(
            tmp,
            model=res.model.cpu(),
            architecture=res.config.architecture,
            classes=res.classes,
            config=res.config.to_dict(),
            score_threshold=record["score_threshold"],
            training=record,
        )
        os.replace(tmp, folder)
        res.model.to(device)
    return res.model, record, False


def _holdout_report(model, data: DetectionSet, threshold: float) -> tuple[dict, list]:
    """evaluate_detections' headline numbers, 95% bootstrap intervals over the hold-out's
    images for mAP and mAP@0.5, and the predictions (for the ONNX comparison)."""
    from quarkflow_core.detection.compare import bootstrap_weights
    from quarkflow_core.detection.metrics import evaluate_detections, image_stats, resampled_map

    preds = detect(model, data.images, score_floor=EVAL_FLOOR)
    report = evaluate_detections(preds, data.targets(), data.classes, score_threshold=threshold)
    stats = [image_stats(p, t) for p, t in zip(preds, data.targets(), strict=True)]
    boot = resampled_map(stats, bootstrap_weights(len(stats), n_boot=N_BOOT, seed=0))
    ci = {
        k: [float(np.nanpercentile(boot[k], 2.5)), float(np.nanpercentile(boot[k], 97.5))]
        for k in ("map", "map_50")
    }
    at = report["at_threshold"] or {}
    out = {
        **{
            k: report[k]
            for k in ("map", "map_50", "map_75", "map_small", "map_medium", "map_large", "mar_100")
        },
        "bootstrap_95ci": {"n_boot": N_BOOT, "over": "hold-out images", **ci},
        "score_threshold": threshold,
        "at_threshold": {k: at.get(k) for k in ("precision", "recall", "f1")},
        "n_images": report["n_images"],
        "n_truth": report["n_truth"],
        "sizes": report["sizes"],
    }
    return out, preds


# --------------------------------------------------------------------------- (a) throughput


def _throughput(device: torch.device) -> dict:
    from quarkflow_core.detection.models import get_detector
    from quarkflow_core.ml.train import seed_everything

    samples = digits_on_photos(SPEED_N, seed=SPEED_SEED, size=SPEED_PX, digit_px=SPEED_DIGIT_PX)
    data = DetectionSet.from_samples(samples, CLASSES)
    cfg = DetectorConfig(
        image_size=SPEED_PX, epochs=SPEED_EPOCHS, num_threads=THREADS, device=device.type
    ).resolved()
    # fit trains on what its validation carve-out leaves: the bare loop gets the same images
    keep, _ = split_detection(len(data), cfg.val_fraction, cfg.seed)
    train = data.subset(keep)
    seen = len(train) * cfg.epochs
    fit_detector(data, replace(cfg, epochs=1))  # pay imports and first allocations once

    def run_fit() -> dict[str, float]:
        """img/s of fit (wall: its own training-only figure and the whole call) and its CPU
        seconds per image (this process, every thread): the whole call, and the training
        alone, i.e. less each epoch's validation + checkpoint (from the last batch event to
        the epoch event) and the model build (timed once beforehand)."""
        marks: list[tuple[str, float]] = []

        def progress(ev) -> None:
            if ev.stage in ("batch", "epoch"):
                marks.append((ev.stage, time.process_time()))

        with tempfile.TemporaryDirectory() as ckpt:
            t0, c0 = time.perf_counter(), time.process_time()
            res = fit_detector(data, cfg, checkpoint_dir=ckpt, progress=progress)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        after_training = sum(
            t - prev[1]
            for prev, (stage, t) in itertools.pairwise(marks)
            if stage == "epoch" and prev[0] == "batch"
        )
        return {
            "training_only": res.images_per_second,
            "whole_call": seen / wall,
            "cpu_whole_call": cpu / seen,
            "cpu_training_only": (cpu - after_training - build_cpu) / seen,
        }

    def build() -> torch.nn.Module:
        seed_everything(cfg.seed)  # what fit does before it builds its model: same init
        return get_detector(
            cfg.architecture,
            num_classes=len(CLASSES),
            pretrained_backbone=bool(cfg.pretrained_backbone),
            image_size=cfg.image_size,
        )

    c0 = time.process_time()
    build()
    build_cpu = time.process_time() - c0

    def run_bare() -> dict[str, float]:
        model = build()
        t0, c0 = time.perf_counter(), time.process_time()
        bare_train_loop(
            model,
            train,
            epochs=cfg.epochs,
            lr=cfg.lr,
            batch_size=cfg.batch_size,
            weight_decay=cfg.weight_decay,
            device=device,
            seed=cfg.seed,
        )
        return {
            "img_s": seen / (time.perf_counter() - t0),
            "cpu": (time.process_time() - c0) / seen,
        }

    runs: dict[str, list[float]] = {
        k: [] for k in ("bare", "bare_cpu", "fit", "fit_whole", "fit_cpu", "fit_cpu_whole")
    }
    load: list[float] = []  # 1-minute load average after each round
    for r in range(ROUNDS):
        if r % 2:
            b = run_bare()
            f = run_fit()
        else:
            f = run_fit()
            b = run_bare()
        runs["bare"].append(b["img_s"])
        runs["bare_cpu"].append(b["cpu"])
        runs["fit"].append(f["training_only"])
        runs["fit_whole"].append(f["whole_call"])
        runs["fit_cpu"].append(f["cpu_training_only"])
        runs["fit_cpu_whole"].append(f["cpu_whole_call"])
        load.append(round(os.getloadavg()[0], 2))
        print(
            f"  round {r + 1}: bare {b['img_s']:.1f} img/s ({b['cpu']:.3f} CPU s/img), fit "
            f"{f['training_only']:.1f} img/s training only ({f['cpu_training_only']:.3f}), "
            f"{f['whole_call']:.1f} img/s whole call ({f['cpu_whole_call']:.3f})",
            flush=True,
        )

    def ratios(mine: str, ref: str, *, cpu: bool = False) -> dict[str, Any]:
        pairs = list(zip(runs[mine], runs[ref], strict=True))
        per_round = [r / m if cpu else m / r for m, r in pairs]
        best = min(runs[ref]) / min(runs[mine]) if cpu else max(runs[mine]) / max(runs[ref])
        return {**_span(per_round), "best_of_rounds": best}

    return {
        "data": f"digits_on_photos({SPEED_N}, seed={SPEED_SEED}, size={SPEED_PX}, "
        f"digit_px={SPEED_DIGIT_PX})",
        "architecture": cfg.architecture,
        "image_size": cfg.image_size,
        "epochs": cfg.epochs,
        "batch_size": cfg.batch_size,
        "images": len(train),
        "rounds": ROUNDS,
        "loadavg_1m_per_round": load,
        "bare_loop_img_s": _span(runs["bare"]),
        "fit_img_s_training_only": _span(runs["fit"]),
        "fit_img_s_whole_call": _span(runs["fit_whole"]),
        "bare_loop_cpu_s_per_img": _span(runs["bare_cpu"]),
        "fit_cpu_s_per_img_training_only": _span(runs["fit_cpu"]),
        "fit_cpu_s_per_img_whole_call": _span(runs["fit_cpu_whole"]),
        "ratio_training_only": ratios("fit", "bare"),
        "ratio_whole_call": ratios("fit_whole", "bare"),
        "ratio_cpu_training_only": ratios("fit_cpu", "bare_cpu", cpu=True),
        "ratio_cpu_whole_call": ratios("fit_cpu_whole", "bare_cpu", cpu=True),
        "note": "ratios are fit/bare speed (>1: fit faster): per round (median, range) and "
        "best of rounds over best of rounds (wall). training only: fit's own img/s (its "
        "epochs' training time); whole call: the fit_detector call's wall time, with "
        "per-epoch validation mAP on the carve-out, a checkpoint per epoch and building the "
        "model. cpu: this process's CPU seconds per image (all threads), less sensitive to "
        "other processes than wall time on a shared machine. Same initial weights and data "
        "order; fit adds a one-cycle schedule and gradient clipping",
    }


# --------------------------------------------------------------------------- (b) inference


def _inference(
    model, architecture: str, classes: list[str], hold: DetectionSet, device: torch.device
) -> dict:
    import onnxruntime

    from quarkflow_core.detection.artifacts import LoadedDetector
    from quarkflow_core.detection.export import OnnxDetector, export_detector_onnx
    from quarkflow_core.detection.metrics import evaluate_detections

    images = hold.images[:INFER_IMAGES]
    with tempfile.TemporaryDirectory() as tmp:
        loaded = LoadedDetector(
            model=model,
            classes=classes,
            score_threshold=0.5,
            manifest={},
            path=Path(tmp) / "artifact",
            architecture=architecture,
        )
        report = export_detector_onnx(
            loaded, Path(tmp) / "model.onnx", sample_images=hold.images[:PARITY_IMAGES]
        )
        model.to(device)  # the export moved it to the CPU
        onnx = OnnxDetector(report["path"], threads=THREADS)

        def eager_pass() -> None:
            for img in images:
                detect(model, [img])

        def onnx_pass() -> None:
            for img in images:
                onnx.run(img)

        variants = {"eager": eager_pass, "onnxruntime": onnx_pass}
        for fn in variants.values():  # warm-up
            fn()
        rates: dict[str, list[float]] = {name: [] for name in variants}
        load: list[float] = []
        for r in range(ROUNDS):
            names = list(variants) if r % 2 == 0 else list(variants)[::-1]
            for name in names:
                t0 = time.perf_counter()
                variants[name]()
                rates[name].append(len(images) / (time.perf_counter() - t0))
            load.append(round(os.getloadavg()[0], 2))
        truths = hold.targets()
        onnx_preds = onnx.detect(hold.images, score_floor=EVAL_FLOOR)
        eager_preds = detect(model, hold.images, score_floor=EVAL_FLOOR)
        maps = {
            name: {k: evaluate_detections(p, truths, classes)[k] for k in ("map", "map_50")}
            for name, p in (("eager", eager_preds), ("onnxruntime", onnx_preds))
        }
    ratios = [o / e for o, e in zip(rates["onnxruntime"], rates["eager"], strict=True)]
    return {
        "image_px": DEMO_PX,
        "images_per_round": len(images),
        "rounds": ROUNDS,
        "loadavg_1m_per_round": load,
        "batch_size": 1,
        "eager_device": str(device),
        "onnxruntime": onnxruntime.__version__,
        "onnxruntime_threads": THREADS,
        "eager_img_s": _span(rates["eager"]),
        "onnxruntime_img_s": _span(rates["onnxruntime"]),
        "ratio_onnxruntime_vs_eager": {
            **_span(ratios),
            "best_of_rounds": max(rates["onnxruntime"]) / max(rates["eager"]),
        },
        "parity": {
            k: report[k]
            for k in (
                "parity_max_abs_diff",
                "parity_max_box_diff_px",
                "parity_unmatched",
                "parity_boxes_compared",
                "parity_images",
                "parity_floor",
                "export_seconds",
                "size_bytes",
            )
        },
        "holdout_map": {**maps, "n_images": len(hold)},
    }


# --------------------------------------------------------------------------- (c) accuracy


def _demo_sets() -> tuple[DetectionSet, DetectionSet]:
    samples = digits_on_photos(DEMO_N, seed=DEMO_SEED, size=DEMO_PX, digit_px=DEMO_DIGIT_PX)
    data = DetectionSet.from_samples(samples, CLASSES)
    n_hold = round(DEMO_N * DEMO_HOLDOUT)
    return data.subset(range(DEMO_N - n_hold)), data.subset(range(DEMO_N - n_hold, DEMO_N))


def _edges(length: int, crop: int) -> list[tuple[int, int]]:
    """The fewest equal, non-overlapping pieces of at most ``crop`` px that cover ``length``:
    (start, stop) pairs. No overlap, so no tree is scored twice."""
    n = -(-length // crop)
    cuts = [round(v) for v in np.linspace(0, length, n + 1)]
    return list(itertools.pairwise(cuts))


def tree_crops() -> tuple[DetectionSet, DetectionSet, dict]:
    """deepforest's tiles cut into a grid of crops of at most TREE_CROP px: (train, the hold-out
    tile's crops, info). A box is clipped to its crop and kept when >= TREE_MIN_VISIBLE of its
    area is inside (so a tree cut by a crop border is counted once, in the crop with more of
    it, or dropped when a corner cuts it into quarters)."""
    from quarkflow_core.detection.assets import TREE_CLASS, deepforest_tiles

    parts: dict[bool, list] = {True: [], False: []}
    info: dict[str, Any] = {"tiles": {}}
    for name, image, boxes in deepforest_tiles():
        h, w = image.shape[:2]
        held = name == TREE_HOLDOUT_TILE
        crops, kept = 0, 0
        for y0, y1 in _edges(h, TREE_CROP):
            for x0, x1 in _edges(w, TREE_CROP):
                crop = np.ascontiguousarray(image[y0:y1, x0:x1])
                ch, cw = crop.shape[:2]
                b = boxes - np.array([x0, y0, x0, y0], dtype=np.float32)
                clipped = b.copy()
                clipped[:, [0, 2]] = clipped[:, [0, 2]].clip(0, cw)
                clipped[:, [1, 3]] = clipped[:, [1, 3]].clip(0, ch)
                area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
                inside = (clipped[:, 2] - clipped[:, 0]).clip(0) * (
                    clipped[:, 3] - clipped[:, 1]
                ).clip(0)
                keep = (inside >= TREE_MIN_VISIBLE * area) & (inside > 0)
                parts[held].append((crop, clipped[keep], np.zeros(int(keep.sum()), np.int64)))
                crops += 1
                kept += int(keep.sum())
        info["tiles"][name] = {
            "size": [int(h), int(w)],
            "boxes": len(boxes),
            "crops": crops,
            "boxes_in_crops": kept,
            "split": "holdout" if held else "train",
        }

    def as_set(items: list) -> DetectionSet:
        return DetectionSet(
            images=[i for i, _, _ in items],
            boxes=[b for _, b, _ in items],
            labels=[lab for _, _, lab in items],
            classes=[TREE_CLASS],
        )

    return as_set(parts[False]), as_set(parts[True]), info


def _trees(device: torch.device) -> dict:
    train, hold, info = tree_crops()
    cfg = DetectorConfig(
        image_size=TREE_CROP,
        epochs=TREE_EPOCHS,
        augment="flip",  # a mirrored tree crown is a tree crown
        num_threads=THREADS,
        device=device.type,
    )
    model, record, cached = _trained("trees", train, cfg, device)
    report, _ = _holdout_report(model, hold, record["score_threshold"])
    return {
        "data": "deepforest's 4 annotated aerial tiles (one class, Tree), cut into "
        f"a grid of equal crops of at most {TREE_CROP} px, no overlap; boxes clipped to the "
        "crop, kept when >= "
        f"{TREE_MIN_VISIBLE:.0%} of their area is inside; hold-out: every crop of "
        f"{TREE_HOLDOUT_TILE}",
        **info,
        "train_crops": len(train),
        "holdout_crops": len(hold),
        "config": f"DetectorConfig(image_size={TREE_CROP}, epochs={TREE_EPOCHS}, "
        "augment='flip'), other settings the defaults",
        "training": _training_fields(record, cached),
        "holdout": report,
    }


def _training_fields(record: dict, cached: bool) -> dict:
    keys = (
        "architecture",
        "image_size",
        "device",
        "epochs_run",
        "best_epoch",
        "train_seconds",
        "wall_seconds",
        "images_per_second",
        "train_images",
        "val_images",
        "val_map50",
        "val_map",
        "score_threshold",
        "trained_at",
        "loadavg_when_done",
    )
    return {**{k: record.get(k) for k in keys}, "cached": cached}


def _print_summary(out: dict) -> None:
    def span(s: dict, fmt: str = ".2f") -> str:
        return f"{s['median']:{fmt}} ({s['min']:{fmt}}-{s['max']:{fmt}})"

    t = out["training_throughput"]
    print(
        f"\ntraining, {t['images']} images @{t['image_size']} px x {t['epochs']} epochs, "
        f"{t['rounds']} rounds: bare {span(t['bare_loop_img_s'], '.1f')} img/s; fit "
        f"{span(t['fit_img_s_training_only'], '.1f')} training only = x"
        f"{span(t['ratio_training_only'])}; whole call {span(t['fit_img_s_whole_call'], '.1f')}"
        f" = x{span(t['ratio_whole_call'])}"
    )
    i = out["inference"]
    print(
        f"inference @{i['image_px']} px batch 1: eager {span(i['eager_img_s'], '.1f')} img/s, "
        f"onnxruntime {span(i['onnxruntime_img_s'], '.1f')} img/s = x"
        f"{span(i['ratio_onnxruntime_vs_eager'])}; parity max |dscore| "
        f"{i['parity']['parity_max_abs_diff']:.2g}, max |dcorner| "
        f"{i['parity']['parity_max_box_diff_px']:.2g} px, unmatched "
        f"{i['parity']['parity_unmatched']}; hold-out mAP@0.5 eager "
        f"{i['holdout_map']['eager']['map_50']:.4f} / onnx "
        f"{i['holdout_map']['onnxruntime']['map_50']:.4f}"
    )
    for key in ("demo_detector", "tree_detector"):
        d = out[key]
        h, tr = d["holdout"], d["training"]
        ci = h["bootstrap_95ci"]
        print(
            f"{key}: hold-out mAP {h['map']:.3f} [{ci['map'][0]:.3f}-{ci['map'][1]:.3f}], "
            f"mAP@0.5 {h['map_50']:.3f} [{ci['map_50'][0]:.3f}-{ci['map_50'][1]:.3f}], "
            f"small/medium/large {h['map_small']} / {h['map_medium']} / {h['map_large']}; "
            f"P/R/F1 at {h['score_threshold']:.2f}: {h['at_threshold']}; "
            f"trained {tr['epochs_run']} epochs in {tr['wall_seconds']:.0f} s"
            + (" (cached)" if tr["cached"] else "")
        )


def main() -> dict:
    import onnxruntime

    start = time.perf_counter()
    load_before = [round(v, 2) for v in os.getloadavg()]
    torch.set_num_threads(THREADS)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    print("training throughput: fit_detector vs bare_train_loop", flush=True)
    throughput = _throughput(device)

    print(f"demo detector: {DEMO_N} digits_on_photos images", flush=True)
    train, hold = _demo_sets()
    cfg = DetectorConfig(epochs=4, num_threads=THREADS, device=device.type)
    model, record, cached = _trained(f"demo{DEMO_N}", train, cfg, device)
    demo_report, _ = _holdout_report(model, hold, record["score_threshold"])
    demo = {
        "data": f"digits_on_photos({DEMO_N}, seed={DEMO_SEED}, size={DEMO_PX}, "
        f"digit_px={DEMO_DIGIT_PX}): the first {len(train)} to train (fit carves 10% out for "
        f"validation), the last {len(hold)} held out",
        "config": "DetectorConfig(epochs=4), other settings the architecture defaults",
        "training": _training_fields(record, cached),
        "holdout": demo_report,
    }

    print("inference: eager vs onnxruntime", flush=True)
    inference = _inference(model, cfg.resolved().architecture, CLASSES, hold, device)

    print("tree detector on deepforest crops", flush=True)
    trees = _trees(device)

    out = {
        "machine": {
            "cpu_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__,
            "device": str(device),
            "loadavg_before": load_before,
            "loadavg_after": [round(v, 2) for v in os.getloadavg()],
            "seconds": time.perf_counter() - start,
            "cache": str(CACHE) if CACHE is not None else None,
        },
        "training_throughput": throughput,
        "inference": inference,
        "demo_detector": demo,
        "tree_detector": trees,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=2))
    _print_summary(out)
    print(f"wrote {RESULTS}; total {out['machine']['seconds']:.0f} s")
    return out


if __name__ == "__main__":
    main()

"""``fit_detector(train, config)``: seeded, resumable detector training with early stopping on
validation mAP@0.5, and ``detect(model, images)``, the one inference path that evaluation,
serving and export parity share.

Mirrors ``ml.train.fit``: the device is chosen once (CUDA with AMP when present, else CPU
threads); a checkpoint is written atomically after every epoch, and a call with the same config
and ``checkpoint_dir`` resumes where an interrupted run stopped and ends with the same weights
(the data order, the flips and torchvision's RPN / RoI sampling all draw from saved RNG state).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from quarkflow_core.detection.data import DetectionSet, split_detection
from quarkflow_core.detection.models import detector_spec, get_detector
from quarkflow_core.errors import InvalidInput
from quarkflow_core.ml.engine import autocast, select_device
from quarkflow_core.ml.train import (
    Options,
    ProgressCallback,
    ProgressEvent,
    _atomic_save,
    seed_everything,
)

CHECKPOINT = "checkpoint.pt"
AUGMENTS = ("none", "flip")
MONITORS = ("map50", "loss")
# The detector that learns digits_on_photos on a laptop CPU in minutes (pretrained backbone);
# ssdlite320 trains from scratch and needs a GPU's hundreds of epochs.
DEFAULT_DETECTOR = "fasterrcnn_mnv2_fpn"

BatchCallback = Callable[[int, int, float], None]  # (step, steps, loss)


@dataclass
class DetectorConfig(Options):
    KIND = "detector training options"

    architecture: str = DEFAULT_DETECTOR
    # None: the architecture's default (``detector_spec(architecture)``); ``resolved()`` fills
    # them in, and a fitted model's config is always resolved, so its fingerprint is explicit
    image_size: int | None = None
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    pretrained_backbone: bool | None = None
    weight_decay: float = 1e-4
    # none / flip (horizontal, boxes mirrored). Off by default: a mirrored digit or letter is
    # another glyph (a mirrored 3 is an ε); turn it on for trees, cars, animals
    augment: str = "none"
    val_fraction: float = 0.1
    monitor: str = "map50"  # early stopping on validation mAP@0.5, or on validation "loss"
    patience: int = 3  # epochs without improvement before stopping
    min_epochs: int | None = None  # never stop before (default: 80% of epochs, as ml.train)
    min_delta: float = 1e-4
    grad_clip: float | None = 10.0  # max gradient norm; from-scratch detectors can spike
    seed: int = 0
    device: str = "auto"
    amp: bool = True  # mixed precision (CUDA only)
    num_threads: int | None = None  # CPU threads; default: torch's choice

    def resolved(self) -> DetectorConfig:
        """A copy with every architecture default filled in."""
        spec = detector_spec(self.architecture)
        return replace(
            self,
            image_size=self.image_size if self.image_size is not None else spec.image_size,
            epochs=self.epochs if self.epochs is not None else spec.epochs,
            batch_size=self.batch_size if self.batch_size is not None else spec.batch_size,
            lr=self.lr if self.lr is not None else spec.lr,
            pretrained_backbone=(
                self.pretrained_backbone
                if self.pretrained_backbone is not None
                else spec.pretrained_backbone
            ),
        )

    def validate(self) -> None:
        spec = detector_spec(self.architecture)
        c = self.resolved()
        if c.epochs < 1 or c.batch_size < 1:
            raise InvalidInput(
                f"epochs and batch_size must be >= 1, got {c.epochs}, {c.batch_size}"
            )
        if not 64 <= c.image_size <= 2048:
            raise InvalidInput(f"image_size must be in 64..2048, got {c.image_size}")
        if c.lr <= 0 or c.weight_decay < 0:
            raise InvalidInput(f"need lr > 0 and weight_decay >= 0, got {c.lr}, {c.weight_decay}")
        if c.pretrained_backbone and not spec.supports_pretrained:
            raise InvalidInput(f"{c.architecture} has no pretrained backbone option")
        if c.augment not in AUGMENTS:
            raise InvalidInput(f"unknown augment {c.augment!r}; valid: {', '.join(AUGMENTS)}")
        if c.monitor not in MONITORS:
            raise InvalidInput(f"unknown monitor {c.monitor!r}; valid: {', '.join(MONITORS)}")
        if not 0.0 < c.val_fraction < 0.5:
            raise InvalidInput(f"val_fraction must be in (0, 0.5), got {c.val_fraction}")
        if c.patience < 1:
            raise InvalidInput(f"patience must be >= 1, got {c.patience}")
        if c.min_epochs is not None and not 1 <= c.min_epochs <= c.epochs:
            raise InvalidInput(
                f"min_epochs must be between 1 and epochs ({c.epochs}), got {c.min_epochs}"
            )
        if c.grad_clip is not None and c.grad_clip <= 0:
            raise InvalidInput(f"grad_clip must be > 0 or None, got {c.grad_clip}")
        if c.num_threads is not None and c.num_threads < 1:
            raise InvalidInput(f"num_threads must be >= 1, got {c.num_threads}")


@dataclass
class DetectorFitResult:
    model: nn.Module
    config: DetectorConfig  # resolved
    classes: list[str]
    device: str
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0
    stopped_early: bool = False
    resumed_from_epoch: int = 0
    train_seconds: float = 0.0
    images_per_second: float = 0.0
    val: DetectionSet | None = None  # the validation carve-out (for threshold choice)

    def summary(self) -> dict[str, Any]:
        best = self.history[self.best_epoch - 1] if self.history and self.best_epoch else {}
        return {
            "architecture": self.config.architecture,
            "image_size": self.config.image_size,
            "pretrained_backbone": self.config.pretrained_backbone,
            "device": self.device,
            "epochs_run": len(self.history),
            "best_epoch": self.best_epoch,
            "stopped_early": self.stopped_early,
            "resumed_from_epoch": self.resumed_from_epoch,
            "train_seconds": round(self.train_seconds, 2),
            "images_per_second": round(self.images_per_second, 2),
            "val_map50": best.get("val_map50"),
            "val_map": best.get("val_map"),
            "val_loss": best.get("val_loss"),
        }


# --------------------------------------------------------------------------- tensors


def _to_tensor(image: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 (H, W, 3) -> float (3, H, W) in 0..1 on ``device`` (converted there: a uint8
    copy to a GPU is 4x smaller than a float one)."""
    if not image.flags.writeable:  # e.g. np.asarray(PIL image); torch warns on those
        image = image.copy()
    return torch.from_numpy(np.ascontiguousarray(image)).to(device).permute(2, 0, 1).float() / 255


def _batch(
    data: DetectionSet,
    idx: Sequence[int],
    device: torch.device,
    *,
    flip: bool,
    generator: torch.Generator | None,
) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """Images and torchvision targets (labels shifted by one: 0 is background there), each
    image mirrored with probability 1/2 when ``flip`` (drawn from ``generator``)."""
    images, targets = [], []
    flips = torch.rand(len(idx), generator=generator) < 0.5 if flip else None
    for j, i in enumerate(idx):
        x = _to_tensor(data.images[i], device)
        boxes = torch.from_numpy(data.boxes[i]).to(device)
        if flips is not None and bool(flips[j]):
            width = x.shape[-1]
            x = x.flip(-1)
            boxes = torch.stack(
                [width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1
            )
        images.append(x)
        targets.append({"boxes": boxes, "labels": torch.from_numpy(data.labels[i]).to(device) + 1})
    return images, targets


# --------------------------------------------------------------------------- primitives


def train_one_epoch(
    model: nn.Module,
    data: DetectionSet,
    *,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    batch_size: int,
    flip: bool = False,
    generator: torch.Generator | None = None,
    scaler: torch.amp.GradScaler | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    grad_clip: float | None = None,
    on_batch: BatchCallback | None = None,
) -> float:
    """One pass over ``data`` in a seeded random order; returns the mean summed detector loss
    (torchvision's loss dict added up, as its reference scripts do)."""
    model.train()
    n = len(data)
    order = torch.randperm(n, generator=generator).tolist()
    steps = (n + batch_size - 1) // batch_size
    use_amp = scaler is not None and device.type == "cuda"
    params = [p for p in model.parameters() if p.requires_grad]
    total, seen = 0.0, 0
    for step in range(steps):
        idx = order[step * batch_size : (step + 1) * batch_size]
        images, targets = _batch(data, idx, device, flip=flip, generator=generator)
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, use_amp):
            loss = sum(model(images, targets).values())
        if not torch.isfinite(loss):
            raise InvalidInput(
                f"the training loss became {float(loss)} at step {step + 1}; lower the lr "
                "(or keep grad_clip on)",
                code="diverged",
            )
        if use_amp:
            scaler.scale(loss).backward()
            if grad_clip is not None:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(params, grad_clip)
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            if grad_clip is not None:
                nn.utils.clip_grad_norm_(params, grad_clip)
            optimizer.step()
        if scheduler is not None:
            scheduler.step()
        batch_loss = float(loss.detach())
        total += batch_loss * len(idx)
        seen += len(idx)
        if on_batch is not None:
            on_batch(step + 1, steps, batch_loss)
    return total / max(seen, 1)


@torch.inference_mode()
def detect(
    model: nn.Module,
    images: Sequence[np.ndarray],
    *,
    device: torch.device | str | None = None,
    batch_size: int | None = None,
    score_floor: float = 0.05,
) -> list[dict[str, np.ndarray]]:
    """Detections per image: {"boxes" float32 (k, 4) xyxy in the ORIGINAL pixels of that
    image, "scores" float32 (k,) descending, "labels" int64 (k,) indices into the classes},
    keeping scores >= ``score_floor``. The model is put in eval mode (and left there).

    Only images of the same size share a batch: torchvision pads a batch to its largest
    image, and the padding changes the feature maps, the anchors and so the boxes, which
    would make an image's boxes depend on its neighbours (and on batch_size).
    ``batch_size`` defaults to 8 on CUDA and 1 on the CPU, where batches of 8 320 px images
    ran 1.6x slower per image (fasterrcnn_mnv2_fpn, torch 2.14, 1 and 2 threads)."""
    if batch_size is not None and batch_size < 1:
        raise InvalidInput(f"batch_size must be >= 1, got {batch_size}")
    for i, img in enumerate(images):
        if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
            raise InvalidInput(f"image {i}: need uint8 (H, W, 3) RGB, got {img.dtype} {img.shape}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    if batch_size is None:
        batch_size = 8 if device.type == "cuda" else 1
    model.eval()
    by_size: dict[tuple[int, int], list[int]] = {}
    for i, img in enumerate(images):
        by_size.setdefault(img.shape[:2], []).append(i)
    out: list[dict[str, np.ndarray] | None] = [None] * len(images)
    for index in by_size.values():
        for start in range(0, len(index), batch_size):
            chunk = index[start : start + batch_size]
            with autocast(device, device.type == "cuda"):
                preds = model([_to_tensor(images[i], device) for i in chunk])
            for i, p in zip(chunk, preds, strict=True):
                out[i] = _numpy_detections(p, images[i].shape[:2], score_floor)
    return out  # type: ignore[return-value]  # every slot is filled above


def _numpy_detections(
    pred: dict[str, torch.Tensor], hw: tuple[int, int], score_floor: float
) -> dict[str, np.ndarray]:
    scores = pred["scores"].float().cpu().numpy()
    keep = np.nonzero(scores >= score_floor)[0]
    keep = keep[np.argsort(-scores[keep], kind="stable")]
    boxes = pred["boxes"].float().cpu().numpy()[keep].reshape(-1, 4)
    h, w = hw
    boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, w)  # torchvision clips too; this is a guard
    boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, h)
    return {
        "boxes": boxes.astype(np.float32),
        "scores": scores[keep].astype(np.float32),
        "labels": pred["labels"].cpu().numpy()[keep].astype(np.int64) - 1,
    }


def map_scores(
    preds: Sequence[dict[str, np.ndarray]], targets: Sequence[dict[str, np.ndarray]]
) -> dict[str, float]:
    """{"map50", "map"} (COCO mAP@0.5 and mAP@0.5:0.95) via torchmetrics on the
    faster-coco-eval backend: what early stopping ranks epochs by. The full report (per class,
    per size) is detection.metrics' job."""
    from torchmetrics.detection import MeanAveragePrecision

    metric = MeanAveragePrecision(iou_type="bbox", backend="faster_coco_eval")
    metric.update(
        [
            {
                "boxes": torch.from_numpy(np.asarray(p["boxes"], dtype=np.float32)).reshape(-1, 4),
                "scores": torch.from_numpy(np.asarray(p["scores"], dtype=np.float32)),
                "labels": torch.from_numpy(np.asarray(p["labels"], dtype=np.int64)),
            }
            for p in preds
        ],
        [
            {
                "boxes": torch.from_numpy(np.asarray(t["boxes"], dtype=np.float32)).reshape(-1, 4),
                "labels": torch.from_numpy(np.asarray(t["labels"], dtype=np.int64)),
            }
            for t in targets
        ],
    )
    res = metric.compute()
    return {"map50": max(float(res["map_50"]), 0.0), "map": max(float(res["map"]), 0.0)}


@torch.no_grad()
def validation_loss(
    model: nn.Module, data: DetectionSet, *, device: torch.device, batch_size: int
) -> float:
    """Mean summed loss on ``data`` without changing the model: torchvision only returns
    losses in train mode, so batch norm is held in eval mode (its running stats stay put) and
    the RNG the RPN / RoI samplers draw from is restored afterwards (so resume stays exact)."""
    was_training = model.training
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
    total = 0.0
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        for start in range(0, len(data), batch_size):
            idx = list(range(start, min(start + batch_size, len(data))))
            images, targets = _batch(data, idx, device, flip=False, generator=None)
            with autocast(device, device.type == "cuda"):
                total += float(sum(model(images, targets).values())) * len(idx)
    model.train(was_training)
    return total / max(len(data), 1)


def bare_train_loop(
    model: nn.Module,
    data: DetectionSet,
    *,
    epochs: int,
    lr: float,
    batch_size: int = 4,
    weight_decay: float = 1e-4,
    device: torch.device | str | None = None,
    seed: int = 0,
) -> list[float]:
    """The torchvision reference loop, nothing else: shuffle, ``sum(model(images,
    targets).values())``, backward, AdamW step; no validation, schedule, clipping, AMP or
    checkpoints. ``make bench`` times it against ``fit_detector`` to price what fit adds.
    Returns the mean loss per epoch; the model is left in eval mode."""
    if epochs < 1:
        raise InvalidInput(f"epochs must be >= 1, got {epochs}")
    device = torch.device(device) if device is not None else select_device()
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(epochs):
        order = torch.randperm(len(data), generator=generator).tolist()
        total = 0.0
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            images, targets = _batch(data, idx, device, flip=False, generator=None)
            loss = sum(model(images, targets).values())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(idx)
        losses.append(total / len(data))
    model.eval()
    return losses


# --------------------------------------------------------------------------- fit


@dataclass
class _LoopState:
    """Everything a checkpoint carries besides the torch objects' own state dicts."""

    history: list[dict[str, float]] = field(default_factory=list)
    best_state: dict[str, torch.Tensor] | None = None
    best_score: float = float("-inf")  # higher is better (mAP, or minus the loss)
    best_epoch: int = 0
    bad_epochs: int = 0


def _check_data(train: DetectionSet, val: DetectionSet | None) -> None:
    least = 4 if val is None else 1  # a carve-out needs a few images to split
    if len(train) < least:
        raise InvalidInput(f"too little data: {len(train)} training images")
    if train.num_boxes() == 0:
        raise InvalidInput("the training images have no boxes; a detector has nothing to learn")
    if val is not None and len(val) == 0:
        raise InvalidInput("the validation set is empty")
    if val is not None and list(val.classes) != list(train.classes):
        raise InvalidInput("train and val have different class lists")


def _resume(
    ckpt_path: Path,
    config: DetectorConfig,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler | None,
    generator: torch.Generator,
    device: torch.device,
) -> tuple[int, _LoopState]:
    """Load a checkpoint written by the same config; (last finished epoch, loop state)."""
    ckpt = torch.load(ckpt_path, map_location=device, weights_only=True)
    if ckpt["config"] != config.fingerprint():
        raise InvalidInput(
            f"checkpoint {ckpt_path} was written by a different training config; "
            "use another checkpoint folder or delete it"
        )
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    if scaler is not None and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    generator.set_state(ckpt["generator"].cpu())
    torch.set_rng_state(ckpt["torch_rng"].cpu())
    if device.type == "cuda" and ckpt.get("cuda_rng") is not None:
        torch.cuda.set_rng_state(ckpt["cuda_rng"].cpu(), device)
    state = _LoopState(**ckpt["loop"])
    return int(ckpt["epoch"]), state


def _save_checkpoint(
    ckpt_path: Path,
    *,
    epoch: int,
    config: DetectorConfig,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler | None,
    generator: torch.Generator,
    device: torch.device,
    state: _LoopState,
) -> None:
    _atomic_save(
        {
            "config": config.fingerprint(),
            "epoch": epoch,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler else {},
            "generator": generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "loop": asdict(state),
        },
        ckpt_path,
    )


def _validate_epoch(
    model: nn.Module, val: DetectionSet, config: DetectorConfig, device: torch.device
) -> dict[str, float]:
    """The epoch's validation numbers: mAP always, the loss when it is what is monitored."""
    preds = detect(model, val.images, device=device, score_floor=0)
    out = {f"val_{k}": v for k, v in map_scores(preds, val.targets()).items()}
    if config.monitor == "loss":
        out["val_loss"] = validation_loss(model, val, device=device, batch_size=config.batch_size)
    return out


def fit_detector(
    train: DetectionSet,
    config: DetectorConfig,
    *,
    val: DetectionSet | None = None,
    progress: ProgressCallback | None = None,
    checkpoint_dir: str | Path | None = None,
    stop_after_epoch: int | None = None,
) -> DetectorFitResult:
    """Train ``config.architecture`` on ``train``; ``val`` defaults to a seeded carve-out of
    ``val_fraction`` of the images. The best epoch's weights (by ``config.monitor``) are
    returned. ``stop_after_epoch`` ends the run early (simulates an interruption in tests)."""
    config.validate()
    config = config.resolved()
    _check_data(train, val)
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    seed_everything(config.seed)
    device = select_device(config.device)
    if val is None:
        keep, held = split_detection(len(train), config.val_fraction, config.seed)
        train, val = train.subset(keep), train.subset(held)

    model = get_detector(
        config.architecture,
        num_classes=len(train.classes),
        pretrained_backbone=bool(config.pretrained_backbone),
        image_size=config.image_size,
    ).to(device)
    steps = (len(train) + config.batch_size - 1) // config.batch_size
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=config.lr,
        weight_decay=config.weight_decay,
    )
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=config.lr, total_steps=config.epochs * steps, pct_start=0.2
    )
    scaler = torch.amp.GradScaler("cuda") if (config.amp and device.type == "cuda") else None
    generator = torch.Generator().manual_seed(config.seed)

    state, start_epoch = _LoopState(), 1
    ckpt_path = Path(checkpoint_dir) / CHECKPOINT if checkpoint_dir else None
    if ckpt_path is not None:
        ckpt_path.parent.mkdir(parents=True, exist_ok=True)
        if ckpt_path.exists():
            done, state = _resume(
                ckpt_path, config, model, optimizer, scheduler, scaler, generator, device
            )
            start_epoch = done + 1

    resumed_from = start_epoch - 1
    started = time.perf_counter()
    train_time = 0.0
    min_epochs = config.min_epochs if config.min_epochs is not None else int(0.8 * config.epochs)
    stopped_early = state.bad_epochs >= config.patience and resumed_from >= min_epochs

    def emit(stage: str, epoch: int, **kw: Any) -> None:
        if progress is not None:
            progress(
                ProgressEvent(
                    stage, epoch, config.epochs, elapsed_s=time.perf_counter() - started, **kw
                )
            )

    for epoch in range(start_epoch, config.epochs + 1):
        if stopped_early:
            break
        t0 = time.perf_counter()
        train_loss = train_one_epoch(
            model,
            train,
            optimizer=optimizer,
            device=device,
            batch_size=config.batch_size,
            flip=config.augment == "flip",
            generator=generator,
            scaler=scaler,
            scheduler=scheduler,
            grad_clip=config.grad_clip,
            on_batch=lambda step, n, loss, epoch=epoch: emit(
                "batch", epoch, step=step, steps=n, train_loss=loss
            ),
        )
        train_time += time.perf_counter() - t0
        scores = _validate_epoch(model, val, config, device)
        state.history.append(
            {
                "epoch": epoch,
                "train_loss": train_loss,
                **scores,
                "lr": scheduler.get_last_lr()[0],
                "seconds": time.perf_counter() - t0,
            }
        )
        score = scores["val_map50"] if config.monitor == "map50" else -scores["val_loss"]
        if score > state.best_score + config.min_delta:
            state.best_score, state.best_epoch, state.bad_epochs = score, epoch, 0
            state.best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            state.bad_epochs += 1
        stopped_early = state.bad_epochs >= config.patience and epoch >= min_epochs
        if ckpt_path is not None:
            _save_checkpoint(
                ckpt_path,
                epoch=epoch,
                config=config,
                model=model,
                optimizer=optimizer,
                scheduler=scheduler,
                scaler=scaler,
                generator=generator,
                device=device,
                state=state,
            )
        emit(
            "epoch",
            epoch,
            step=steps,
            steps=steps,
            train_loss=train_loss,
            val_loss=scores.get("val_loss"),
            val_map=scores["val_map50"],
        )
        if stop_after_epoch is not None and epoch >= stop_after_epoch:
            break

    if state.best_state is not None:
        model.load_state_dict(state.best_state)
    model.eval()
    epochs_this_call = len(state.history) - resumed_from
    result = DetectorFitResult(
        model=model,
        config=copy.deepcopy(config),
        classes=list(train.classes),
        device=str(device),
        history=state.history,
        best_epoch=state.best_epoch,
        stopped_early=stopped_early,
        resumed_from_epoch=resumed_from,
        train_seconds=train_time,
        images_per_second=(len(train) * epochs_this_call / train_time) if train_time else 0.0,
        val=val,
    )
    emit("done", len(state.history), message=f"best epoch {state.best_epoch}")
    return result

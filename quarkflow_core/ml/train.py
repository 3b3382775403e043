"""``fit(train, config)``: seeded, resumable training with early stopping and progress events.

The device is chosen once (CUDA with AMP + channels_last when present, else CPU threads). A
checkpoint is written atomically after every epoch; ``fit`` with the same config and
``checkpoint_dir`` resumes where a crashed run stopped and ends with the same weights.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from quarkflow_core.errors import InvalidInput
from quarkflow_core.ml.data import ImageSet, stratified_split
from quarkflow_core.ml.engine import predict_logits, select_device, train_one_epoch
from quarkflow_core.ml.models import get_model, model_spec
from quarkflow_core.ml.transforms import Preprocess, eval_preset, train_preset

CHECKPOINT = "checkpoint.pt"


class Options:
    """What a training config dataclass shares: built from a dict that may hold only its own
    fields, dumped to one, and fingerprinted (a checkpoint names the config it belongs to)."""

    KIND = "training options"  # how an unknown key is reported

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Any:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise InvalidInput(f"unknown {cls.KIND}: {sorted(unknown)}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()


@dataclass
class TrainConfig(Options):
    architecture: str = "smallcnn"
    preset: str | None = None  # eval preset name; default: the architecture's
    image_size: int | None = None  # override the preset's size
    augment: str = "light"  # train preset: none / light / photo
    epochs: int = 15
    batch_size: int = 128
    lr: float = 3e-3
    weight_decay: float = 1e-4
    label_smoothing: float = 0.0
    val_fraction: float = 0.1
    patience: int = 4  # epochs without val-loss improvement before stopping
    # early stopping never ends a run before this epoch (default: 80% of ``epochs``): the
    # one-cycle schedule's high-LR phase makes validation loss swing, and the best weights
    # come from the low-LR annealing phase
    min_epochs: int | None = None
    min_delta: float = 1e-4
    class_weights: bool = False  # inverse-frequency loss weights for imbalanced data
    seed: int = 0
    device: str = "auto"
    amp: bool = True  # mixed precision (CUDA only)
    num_threads: int | None = None  # CPU threads; default: torch's choice
    pretrained_weights: str | None = None  # local file, or 'package' for efficientnet_lite0

    def validate(self) -> None:
        model_spec(self.architecture)
        train_preset(self.augment)
        if self.epochs < 1 or self.batch_size < 1:
            raise InvalidInput("epochs and batch_size must be >= 1")
        if not 0.0 < self.val_fraction < 0.5:
            raise InvalidInput(f"val_fraction must be in (0, 0.5), got {self.val_fraction}")
        if self.lr <= 0:
            raise InvalidInput(f"lr must be > 0, got {self.lr}")
        if self.min_epochs is not None and not 1 <= self.min_epochs <= self.epochs:
            raise InvalidInput(
                f"min_epochs must be between 1 and epochs ({self.epochs}), got {self.min_epochs}"
            )

    def eval_preset(self, in_channels: int | None = None) -> Preprocess:
        name = self.preset or model_spec(self.architecture).default_preset
        return eval_preset(name, size=self.image_size, channels=in_channels)


@dataclass(frozen=True)
class ProgressEvent:
    """What a progress bar, a Prefect artifact or a Streamlit page needs to show."""

    stage: str  # "batch" | "epoch" | "done"
    epoch: int
    epochs: int
    step: int = 0
    steps: int = 0
    train_loss: float | None = None
    val_loss: float | None = None
    val_accuracy: float | None = None
    elapsed_s: float = 0.0
    message: str = ""
    val_map: float | None = None  # detection: validation mAP@0.5


ProgressCallback = Callable[[ProgressEvent], None]


@dataclass
class FitResult:
    model: nn.Module
    preset: Preprocess
    config: TrainConfig
    classes: list[str]
    in_channels: int
    device: str
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0
    stopped_early: bool = False
    resumed_from_epoch: int = 0
    train_seconds: float = 0.0
    images_per_second: float = 0.0
    val: ImageSet | None = None  # the validation carve-out (for calibration)

    def summary(self) -> dict[str, Any]:
        best = self.history[self.best_epoch - 1] if self.history else {}
        return {
            "architecture": self.config.architecture,
            "device": self.device,
            "epochs_run": len(self.history),
            "best_epoch": self.best_epoch,
            "stopped_early": self.stopped_early,
            "resumed_from_epoch": self.resumed_from_epoch,
            "train_seconds": round(self.train_seconds, 2),
            "images_per_second": round(self.images_per_second, 1),
            "val_loss": best.get("val_loss"),
            "val_accuracy": best.get("val_accuracy"),
        }


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def class_weight_tensor(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    counts = torch.bincount(labels, minlength=num_classes).float().clamp(min=1)
    return counts.sum() / (num_classes * counts)


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def fit(
    train: ImageSet,
    config: TrainConfig,
    *,
    val: ImageSet | None = None,
    progress: ProgressCallback | None = None,
    checkpoint_dir: str | Path | None = None,
    stop_after_epoch: int | None = None,
) -> FitResult:
    """Train ``config.architecture`` on ``train``; ``val`` defaults to a stratified carve-out.

    ``stop_after_epoch`` ends the run early (simulates an interruption in tests)."""
    config.validate()
    if len(train) < 2 * len(train.classes):
        raise InvalidInput(f"too little data: {len(train)} images for {len(train.classes)} classes")
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    seed_everything(config.seed)
    device = select_device(config.device)
    in_channels = int(train.images.shape[1])
    preset = config.eval_preset(in_channels)
    if (preset.size, preset.size) != tuple(train.images.shape[2:]):
        raise InvalidInput(
            f"images are {tuple(train.images.shape[2:])} but preset {preset.name} expects "
            f"{preset.size}x{preset.size}; load the data with the same preset"
        )
    if val is None:
        keep, held = stratified_split(train.labels, fraction=config.val_fraction, seed=config.seed)
        train, val = train.subset(keep), train.subset(held)

    num_classes = len(train.classes)
    model = get_model(
        config.architecture,
        num_classes=num_classes,
        in_channels=in_channels,
        pretrained_weights=config.pretrained_weights,
    ).to(device)
    channels_last = device.type == "cuda"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    steps = (len(train) + config.batch_size - 1) // config.batch_size
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.lr, weight_decay=config.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=config.lr, total_steps=config.epochs * steps, pct_start=0.2
    )
    weight = (
        class_weight_tensor(train.labels, num_classes).to(device) if config.class_weights else None
    )
    criterion = nn.CrossEntropyLoss(weight=weight, label_smoothing=config.label_smoothing)
    eval_criterion = nn.CrossEntropyLoss()
    scaler = torch.amp.GradScaler("cuda") if (config.amp and device.type == "cuda") else None
    generator = torch.Generator().manual_seed(config.seed)
    augment = train_preset(config.augment)

    history: list[dict[str, float]] = []
    best_state: dict[str, torch.Tensor] | None = None
    best_loss, best_epoch, bad_epochs, start_epoch = float("inf"), 0, 0, 1
    ckpt_path = Path(checkpoint_dir) / CHECKPOINT if checkpoint_dir else None
    if ckpt_path is not None:
        ckpt_path.parent.mkdir(parents=True, exist_ok=True)
        if ckpt_path.exists():
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
            generator.set_state(ckpt["generator"])
            torch.set_rng_state(ckpt["torch_rng"])
            history = ckpt["history"]
            best_state = ckpt["best_state"]
            best_loss, best_epoch, bad_epochs = (
                ckpt["best_loss"],
                ckpt["best_epoch"],
                ckpt["bad_epochs"],
            )
            start_epoch = ckpt["epoch"] + 1

    resumed_from = start_epoch - 1
    started = time.perf_counter()
    train_time = 0.0
    min_epochs = config.min_epochs if config.min_epochs is not None else int(0.8 * config.epochs)
    stopped_early = bad_epochs >= config.patience and start_epoch - 1 >= min_epochs
    for epoch in range(start_epoch, config.epochs + 1):
        if stopped_early:
            break
        t0 = time.perf_counter()

        def on_batch(step: int, n: int, loss: float, epoch: int = epoch) -> None:
            if progress is not None:
                progress(
                    ProgressEvent(
                        "batch",
                        epoch,
                        config.epochs,
                        step,
                        n,
                        train_loss=loss,
                        elapsed_s=time.perf_counter() - started,
                    )
                )

        train_loss = train_one_epoch(
            model,
            train,
            optimizer=optimizer,
            criterion=criterion,
            preset=preset,
            device=device,
            batch_size=config.batch_size,
            augment=augment,
            generator=generator,
            scaler=scaler,
            scheduler=scheduler,
            channels_last=channels_last,
            on_batch=on_batch,
        )
        train_time += time.perf_counter() - t0
        logits = predict_logits(
            model, val.images, preset, device=device, channels_last=channels_last
        )
        val_loss = float(eval_criterion(logits, val.labels))
        val_acc = float((logits.argmax(1) == val.labels).float().mean())
        history.append(
            {
                "epoch": epoch,
                "train_loss": train_loss,
                "val_loss": val_loss,
                "val_accuracy": val_acc,
                "lr": scheduler.get_last_lr()[0],
                "seconds": time.perf_counter() - t0,
            }
        )
        if val_loss < best_loss - config.min_delta:
            best_loss, best_epoch, bad_epochs = val_loss, epoch, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            bad_epochs += 1
        stopped_early = bad_epochs >= config.patience and epoch >= min_epochs
        if ckpt_path is not None:
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
                    "history": history,
                    "best_state": best_state,
                    "best_loss": best_loss,
                    "best_epoch": best_epoch,
                    "bad_epochs": bad_epochs,
                },
                ckpt_path,
            )
        if progress is not None:
            progress(
                ProgressEvent(
                    "epoch",
                    epoch,
                    config.epochs,
                    steps,
                    steps,
                    train_loss=train_loss,
                    val_loss=val_loss,
                    val_accuracy=val_acc,
                    elapsed_s=time.perf_counter() - started,
                )
            )
        if stop_after_epoch is not None and epoch >= stop_after_epoch:
            break

    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    epochs_this_call = len(history) - resumed_from
    result = FitResult(
        model=model,
        preset=preset,
        config=copy.deepcopy(config),
        classes=list(train.classes),
        in_channels=in_channels,
        device=str(device),
        history=history,
        best_epoch=best_epoch,
        stopped_early=stopped_early,
        resumed_from_epoch=resumed_from,
        train_seconds=train_time,
        images_per_second=(len(train) * epochs_this_call / train_time) if train_time else 0.0,
        val=val,
    )
    if progress is not None:
        progress(
            ProgressEvent(
                "done",
                len(history),
                config.epochs,
                elapsed_s=time.perf_counter() - started,
                message=f"best epoch {best_epoch}",
            )
        )
    return result

"""The two primitives everything else is built on: one training epoch and batched inference.
``fit``, evaluation, pruning recovery and the benchmarks all call these."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn

from quarkflow_core.errors import InvalidInput
from quarkflow_core.ml.data import ImageSet
from quarkflow_core.ml.transforms import Augment, Preprocess

BatchCallback = Callable[[int, int, float], None]  # (step, steps, loss)


def select_device(preference: str = "auto") -> torch.device:
    """Chosen once per run: CUDA when present (or asked for), else CPU."""
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(preference)


def autocast(device: torch.device, enabled: bool):
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return nullcontext()


def train_one_epoch(
    model: nn.Module,
    data: ImageSet,
    *,
    optimizer: torch.optim.Optimizer,
    criterion: nn.Module,
    preset: Preprocess,
    device: torch.device,
    batch_size: int = 128,
    augment: Augment | None = None,
    generator: torch.Generator | None = None,
    scaler: torch.amp.GradScaler | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    channels_last: bool = False,
    on_batch: BatchCallback | None = None,
) -> float:
    """One pass over ``data`` in a seeded random order; returns the mean training loss."""
    model.train()
    n = len(data)
    order = torch.randperm(n, generator=generator)
    steps = (n + batch_size - 1) // batch_size
    total, seen = 0.0, 0
    use_amp = scaler is not None and device.type == "cuda"
    for step in range(steps):
        idx = order[step * batch_size : (step + 1) * batch_size]
        x = preset.normalize(data.images[idx].to(device, non_blocking=True))
        y = data.labels[idx].to(device, non_blocking=True)
        if augment is not None:
            x = augment(x, generator)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, use_amp):
            loss = criterion(model(x), y)
        if use_amp:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
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
def predict_logits(
    model: nn.Module,
    images: torch.Tensor,
    preset: Preprocess,
    *,
    device: torch.device | None = None,
    batch_size: int = 256,
    channels_last: bool = False,
) -> torch.Tensor:
    """Logits (N, C) on the CPU for uint8 images (N, C, H, W), in eval mode."""
    device = device or next(model.parameters()).device
    model.eval()
    outs = []
    for start in range(0, images.shape[0], batch_size):
        x = preset.normalize(images[start : start + batch_size].to(device))
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, device.type == "cuda"):
            outs.append(model(x).float().cpu())
    return torch.cat(outs) if outs else torch.empty(0)


def train_epochs(
    model: nn.Module,
    data: ImageSet,
    preset: Preprocess,
    *,
    epochs: int,
    lr: float,
    batch_size: int = 128,
    device: torch.device | None = None,
    seed: int = 0,
) -> list[float]:
    """A plain AdamW + cross-entropy run of ``epochs`` seeded epochs over all of ``data`` (no
    validation carve-out, no schedule): pruning recovery, benchmarks and test fixtures.
    Returns the mean training loss per epoch; the model is left in eval mode."""
    if epochs < 1:
        raise InvalidInput(f"epochs must be >= 1, got {epochs}")
    device = device or select_device()
    model.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    criterion = nn.CrossEntropyLoss()
    generator = torch.Generator().manual_seed(seed)
    losses = [
        train_one_epoch(
            model,
            data,
            optimizer=optimizer,
            criterion=criterion,
            preset=preset,
            device=device,
            batch_size=batch_size,
            generator=generator,
        )
        for _ in range(epochs)
    ]
    model.eval()
    return losses


def time_calls(fn: Callable[[Any], Any], x: Any, *, repeats: int, warmup: int) -> list[float]:
    """Wall time of ``fn(x)`` in ms for each of ``repeats`` calls after ``warmup`` untimed ones."""
    if repeats < 1:
        raise InvalidInput(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        fn(x)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(x)
        times.append((time.perf_counter() - start) * 1000.0)
    return times


def median_latency_ms(
    fn: Callable[[Any], Any], x: Any, *, repeats: int = 10, warmup: int = 3
) -> float:
    """Median wall time of ``fn(x)`` in ms after ``warmup`` untimed calls (perf_counter)."""
    return statistics.median(time_calls(fn, x, repeats=repeats, warmup=warmup))

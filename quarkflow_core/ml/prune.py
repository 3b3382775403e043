"""Pruning: structured channel removal (smaller, faster dense network), unstructured weight
zeroing (sparser, NOT faster), BN recalibration + short recovery fine-tuning, before/after
measurement, and pickle-free persistence of a pruned architecture.

Structured pruning uses torch-pruning's dependency graph so coupled layers (residual adds,
depthwise convs, BN) shrink together and the result is an ordinary, smaller ``nn.Module``."""

from __future__ import annotations

import copy
import os
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from quarkflow_core.errors import InvalidInput, QuarkflowError
from quarkflow_core.ml.data import ImageSet
from quarkflow_core.ml.engine import (
    median_latency_ms,
    predict_logits,
    select_device,
    train_epochs,
)
from quarkflow_core.ml.transforms import Preprocess

PRUNED_FORMAT = "quarkflow.pruned/1"
UNSTRUCTURED_NOTE = (
    "unstructured pruning only zeroes weights: tensors stay dense, so the file size, MACs and "
    "dense CPU latency do not improve (it needs a sparse kernel or compression to pay off)"
)


# --------------------------------------------------------------------------- structured


def _classifier_layers(model: nn.Module, example_input: torch.Tensor) -> list[nn.Module]:
    """The output layer(s): nn.Linear whose out_features equals the number of logits."""
    with torch.no_grad():
        num_classes = int(model(example_input).shape[-1])
    heads = [
        m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == num_classes
    ]
    if not heads:
        raise InvalidInput(
            f"no nn.Linear with out_features={num_classes} found; pass ignored_layers explicitly"
        )
    return heads


def _same_modules_in_copy(
    original: nn.Module, clone: nn.Module, modules: Iterable[nn.Module]
) -> list[nn.Module]:
    names = {id(m): n for n, m in original.named_modules()}
    out = []
    for m in modules:
        if id(m) not in names:
            raise InvalidInput(f"ignored layer {type(m).__name__} is not part of the model")
        out.append(clone.get_submodule(names[id(m)]))
    return out


def prune_structured(
    model: nn.Module,
    example_input: torch.Tensor,
    *,
    ratio: float,
    ignored_layers: Sequence[nn.Module] | None = None,
    round_to: int | None = None,
) -> nn.Module:
    """A physically smaller copy: ``ratio`` of the output channels of every prunable layer is
    removed (L2-magnitude, per layer), except the classifier whose outputs are the classes.

    ``ignored_layers`` may name modules of ``model`` (default: auto-detected classifier).
    ``round_to`` keeps channel counts multiples of N (vector-friendly on CPU)."""
    import torch_pruning as tp

    if not 0.0 < ratio < 1.0:
        raise InvalidInput(f"ratio must be in (0, 1), got {ratio}")
    was_training = model.training
    clone = copy.deepcopy(model).eval()  # eval: tracing must not touch BN running stats
    example_input = example_input.to(next(clone.parameters()).device)
    ignored = (
        _same_modules_in_copy(model, clone, ignored_layers)
        if ignored_layers is not None
        else _classifier_layers(clone, example_input)
    )
    params_before = sum(p.numel() for p in clone.parameters())
    pruner = tp.pruner.MetaPruner(
        clone,
        example_input,
        importance=tp.importance.MagnitudeImportance(p=2),
        global_pruning=False,
        pruning_ratio=ratio,
        ignored_layers=ignored,
        round_to=round_to,
    )
    pruner.step()
    if sum(p.numel() for p in clone.parameters()) >= params_before:
        raise QuarkflowError(
            f"structured pruning at ratio {ratio} removed nothing", code="prune_failed"
        )
    for p in clone.parameters():  # torch-pruning hands back fresh Parameters; keep them trainable
        p.requires_grad_(True)
    return clone.train(was_training)


def channel_counts(model: nn.Module) -> dict[str, int]:
    """Output channels/features per conv and linear layer: what pruning changed, at a glance."""
    return {
        name: (m.out_channels if isinstance(m, _ConvNd) else m.out_features)
        for name, m in model.named_modules()
        if isinstance(m, _ConvNd | nn.Linear)
    }


# --------------------------------------------------------------------------- recovery


@torch.no_grad()
def recalibrate_bn(
    model: nn.Module,
    images_uint8: torch.Tensor,
    preset: Preprocess,
    *,
    batches: int = 20,
    batch_size: int = 128,
    seed: int = 0,
) -> nn.Module:
    """Re-estimate BatchNorm running stats: pruning changes each BN's input distribution, and
    stale stats are often most of the accuracy loss. Only BN layers run in train mode (dropout
    stays off); a cumulative average over ``batches`` batches replaces the momentum average."""
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    if not bns:
        return model
    if images_uint8.shape[0] == 0:
        raise InvalidInput("recalibrate_bn needs at least one image")
    was_training = model.training
    device = next(model.parameters()).device
    momenta = [bn.momentum for bn in bns]
    model.eval()
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative moving average: an exact mean over the batches seen
        bn.train()
    order = torch.randperm(images_uint8.shape[0], generator=torch.Generator().manual_seed(seed))
    try:
        for step in range(batches):
            idx = order[step * batch_size : (step + 1) * batch_size]
            if idx.numel() == 0:
                break
            model(preset.normalize(images_uint8[idx].to(device)))
    finally:
        for bn, momentum in zip(bns, momenta, strict=True):
            bn.momentum = momentum
        model.train(was_training)
    return model


def recover(
    model: nn.Module,
    data: ImageSet,
    preset: Preprocess,
    *,
    epochs: int = 1,
    lr: float = 1e-3,
    batch_size: int = 128,
    device: torch.device | None = None,
    seed: int = 0,
) -> list[float]:
    """Short fine-tune of a pruned model (in place) after BN recalibration; returns the mean
    training loss per epoch. A few epochs recover most of the accuracy lost to pruning."""
    if epochs < 1:
        raise InvalidInput(f"epochs must be >= 1, got {epochs}")
    device = device or select_device()
    model.to(device)
    recalibrate_bn(model, data.images, preset, batch_size=batch_size, seed=seed)
    return train_epochs(
        model, data, preset, epochs=epochs, lr=lr, batch_size=batch_size, device=device, seed=seed
    )


# --------------------------------------------------------------------------- unstructured


def _prunable_weights(model: nn.Module) -> list[tuple[nn.Module, str]]:
    return [(m, "weight") for m in model.modules() if isinstance(m, _ConvNd | nn.Linear)]


def prune_unstructured(model: nn.Module, *, amount: float) -> nn.Module:
    """A copy with the ``amount`` smallest-|w| conv+linear weights (global L1) set to zero.

    Honest caveat: the tensors stay dense, so this does NOT speed up dense CPU inference nor
    shrink the saved state_dict; it only helps with sparse kernels or compression. See
    ``weight_sparsity`` for the achieved fraction of zeros."""
    from torch.nn.utils import prune

    if not 0.0 < amount < 1.0:
        raise InvalidInput(f"amount must be in (0, 1), got {amount}")
    clone = copy.deepcopy(model)
    targets = _prunable_weights(clone)
    if not targets:
        raise InvalidInput("model has no conv or linear weights to prune")
    prune.global_unstructured(targets, pruning_method=prune.L1Unstructured, amount=amount)
    for module, name in targets:
        prune.remove(module, name)  # bake the mask in: plain dense weights, no hooks
    return clone


def weight_sparsity(model: nn.Module) -> float:
    """Fraction of exactly-zero conv+linear weights."""
    zeros = total = 0
    for module, name in _prunable_weights(model):
        w = getattr(module, name)
        zeros += int((w == 0).sum())
        total += w.numel()
    return zeros / total if total else 0.0


# --------------------------------------------------------------------------- measurement


def state_dict_bytes(model: nn.Module) -> int:
    """Size of ``torch.save(model.state_dict())`` on disk: what an artifact would weigh."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "weights.pt")
        torch.save(model.state_dict(), path)
        return os.path.getsize(path)


def batch_of(images_uint8: torch.Tensor, n: int) -> torch.Tensor:
    """``n`` images, cycling through the given ones when there are fewer."""
    if images_uint8.shape[0] == 0:
        raise InvalidInput("need at least one image")
    idx = torch.arange(n) % images_uint8.shape[0]
    return images_uint8[idx]


def measure(
    model: nn.Module,
    preset: Preprocess,
    *,
    images_uint8: torch.Tensor,
    labels: torch.Tensor | None,
    batch_sizes: Sequence[int] = (1, 32),
    repeats: int = 10,
    warmup: int = 3,
) -> dict[str, Any]:
    """MACs, params, bytes on disk, CPU latency (median ms per batch, current torch thread
    count) and accuracy on the given images (None without labels). The model is measured on
    the CPU in eval mode; a copy is made if it lives elsewhere."""
    import torch_pruning as tp

    cpu = torch.device("cpu")
    if any(p.device != cpu for p in model.parameters()):
        model = copy.deepcopy(model).to(cpu)
    was_training = model.training
    model.eval()
    try:
        example = preset.normalize(images_uint8[:1])
        macs, params = tp.utils.count_ops_and_params(model, example)
        out: dict[str, Any] = {
            "macs": int(macs),
            "params": int(params),
            "bytes": state_dict_bytes(model),
            "threads": torch.get_num_threads(),
        }
        with torch.inference_mode():
            for bs in batch_sizes:
                x = preset.normalize(batch_of(images_uint8, bs))
                out[f"latency_ms_b{bs}"] = median_latency_ms(
                    model, x, repeats=repeats, warmup=warmup
                )
        if labels is not None:
            pred = predict_logits(model, images_uint8, preset, device=cpu).argmax(1)
            out["accuracy"] = float((pred == labels.cpu()).float().mean())
        else:
            out["accuracy"] = None
    finally:
        model.train(was_training)
    return out


@dataclass
class PruneReport:
    """Before/after numbers of one pruning run, ready for a JSON manifest or a table."""

    method: str  # "structured-l2" | "unstructured-l1"
    ratio: float
    before: dict[str, Any]
    after: dict[str, Any]
    sparsity: float | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def accuracy_drop(self) -> float | None:
        a, b = self.before.get("accuracy"), self.after.get("accuracy")
        return None if a is None or b is None else a - b

    def ratios(self) -> dict[str, float]:
        """after/before for size and MACs; before/after (speed-up) for latencies."""
        out = {}
        for key in ("macs", "params", "bytes"):
            if self.before.get(key) and key in self.after:
                out[f"{key}_ratio"] = self.after[key] / self.before[key]
        for key, value in self.before.items():
            if key.startswith("latency_ms_") and self.after.get(key):
                out[f"speedup_{key.removeprefix('latency_ms_')}"] = value / self.after[key]
        return out

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "accuracy_drop": self.accuracy_drop, **self.ratios()}


def structured_report(ratio: float, before: dict, after: dict) -> PruneReport:
    return PruneReport("structured-l2", ratio, before, after)


def unstructured_report(amount: float, before: dict, after: dict, sparsity: float) -> PruneReport:
    return PruneReport(
        "unstructured-l1", amount, before, after, sparsity=sparsity, notes=[UNSTRUCTURED_NOTE]
    )


# --------------------------------------------------------------------------- persistence

_SHAPE_ATTRS: dict[type, tuple[str, ...]] = {
    _ConvNd: ("in_channels", "out_channels", "groups"),
    nn.Linear: ("in_features", "out_features"),
    _BatchNorm: ("num_features",),
    nn.GroupNorm: ("num_groups", "num_channels"),
}


def _shape_attrs(module: nn.Module) -> tuple[str, ...]:
    for kind, attrs in _SHAPE_ATTRS.items():
        if isinstance(module, kind):
            return attrs
    return ()


def pruned_state(model: nn.Module) -> dict[str, Any]:
    """A pickle-free description of a pruned model: per-layer channel counts + the state_dict.
    Only str/int/tensor values, so ``torch.load(..., weights_only=True)`` can read it
    (``torch_pruning.state_dict`` pickles whole modules and cannot)."""
    layers = {}
    for name, module in model.named_modules():
        attrs = _shape_attrs(module)
        if attrs:
            layers[name] = {a: int(getattr(module, a)) for a in attrs}
    return {
        "format": PRUNED_FORMAT,
        "layers": layers,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }


def load_pruned(
    arch_name: str, num_classes: int, in_channels: int, state: dict[str, Any]
) -> nn.Module:
    """Rebuild the registry architecture, resize its layers to the stored channel counts and
    load the weights strictly. Returns the model in eval mode on the CPU."""
    from quarkflow_core.ml.models import get_model

    if not isinstance(state, dict) or state.get("format") != PRUNED_FORMAT:
        raise InvalidInput(f"not a pruned-model state (expected format {PRUNED_FORMAT!r})")
    model = get_model(arch_name, num_classes=num_classes, in_channels=in_channels)
    weights: dict[str, torch.Tensor] = state["state_dict"]
    for name, attrs in state["layers"].items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise InvalidInput(f"layer {name!r} does not exist in {arch_name}") from None
        for attr, value in attrs.items():
            setattr(module, attr, value)
    for key, tensor in weights.items():
        owner, _, local = key.rpartition(".")
        try:
            module = model.get_submodule(owner)
        except AttributeError:
            raise InvalidInput(f"weight {key!r} does not exist in {arch_name}") from None
        # resize mismatched tensors; load_state_dict below fills in the values
        param, buffer = module._parameters.get(local), module._buffers.get(local)
        if param is not None and param.shape != tensor.shape:
            module._parameters[local] = nn.Parameter(torch.empty_like(tensor))
        elif buffer is not None and buffer.shape != tensor.shape:
            module._buffers[local] = torch.empty_like(tensor)
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as exc:
        raise InvalidInput(f"pruned state does not fit {arch_name}: {exc}") from None
    return model.eval()

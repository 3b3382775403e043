"""Temperature scaling (fitted on validation logits) and the review threshold derived from it."""

from __future__ import annotations

import torch

from quarkflow_core.errors import InvalidInput


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, *, max_iter: int = 200) -> float:
    """The T > 0 minimising the NLL of softmax(logits / T) on held-out data (Guo et al. 2017).

    When the model gets every validation image right (a small validation split), the NLL keeps
    falling as T -> 0: there is nothing to calibrate against, and T = 1 (the model's own
    scores) is returned rather than an infinitely sharp softmax."""
    if logits.shape[0] == 0:
        raise InvalidInput("no validation logits to calibrate on")
    if bool((logits.argmax(1) == labels).all()):
        return 1.0
    logits = logits.detach().float().clone()  # inference-mode tensors cannot join autograd
    log_t = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=max_iter, line_search_fn="strong_wolfe")
    nll = torch.nn.CrossEntropyLoss()

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = nll(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    opt.step(closure)
    t = float(log_t.detach().exp())
    if not (0.01 < t < 100.0):
        raise InvalidInput(f"temperature fit diverged (T={t:.3g}); check the validation data")
    return t


def threshold_for_accuracy(
    probs: torch.Tensor, labels: torch.Tensor, *, target: float = 0.99
) -> dict[str, float]:
    """Lowest confidence t such that predictions with confidence >= t are right >= target.

    Predictions below t go to review. Returns t, the accuracy above it and the share of
    predictions that would be auto-accepted (coverage)."""
    if not 0.0 < target <= 1.0:
        raise InvalidInput(f"target accuracy must be in (0, 1], got {target}")
    conf, pred = probs.max(dim=1)
    correct = (pred == labels).float()
    order = torch.argsort(conf, descending=True)
    conf, correct = conf[order], correct[order]
    running = torch.cumsum(correct, 0) / torch.arange(1, len(correct) + 1)
    ok = torch.nonzero(running >= target).flatten()
    if len(ok) == 0:
        return {"threshold": 1.0, "accuracy_above": float("nan"), "coverage": 0.0, "target": target}
    last = int(ok[-1])
    return {
        "threshold": float(conf[last]),
        "accuracy_above": float(running[last]),
        "coverage": (last + 1) / len(conf),
        "target": target,
    }

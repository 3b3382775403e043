"""Training throughput of ``fit`` vs a bare torch loop (same model, data, batch size, epochs,
measured in the same run), and the default demo model's accuracy and wall time on the full
demo set. Writes bench/results/train.json."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from quarkflow_core.datasets import stratified_holdout
from quarkflow_core.demo_data import HOLDOUT_FRACTION, SPLIT_SEED, demo_pngs
from quarkflow_core.ml.data import ImageSet, decode
from quarkflow_core.ml.engine import predict_logits
from quarkflow_core.ml.models import get_model
from quarkflow_core.ml.train import TrainConfig, fit
from quarkflow_core.ml.transforms import eval_preset

RESULTS = Path(__file__).parent / "results" / "train.json"


def demo_sets() -> tuple[ImageSet, ImageSet]:
    preset = eval_preset("digits28")
    pngs, labels = demo_pngs()
    imgs = torch.from_numpy(np.stack([decode(b, preset) for b in pngs]))
    y = torch.tensor([int(lbl) for lbl in labels])
    mask = torch.tensor(stratified_holdout(labels, fraction=HOLDOUT_FRACTION, seed=SPLIT_SEED))
    classes = [str(i) for i in range(10)]
    ids = [str(i) for i in range(len(y))]
    keep = [i for i, m in zip(ids, mask, strict=True) if not m]
    held = [i for i, m in zip(ids, mask, strict=True) if m]
    train = ImageSet(imgs[~mask], y[~mask], classes, keep)
    hold = ImageSet(imgs[mask], y[mask], classes, held)
    return train, hold


def bare_loop(train: ImageSet, *, epochs: int, batch_size: int, lr: float) -> float:
    """The reference: the plainest correct loop over the same tensors. Returns img/s."""
    preset = eval_preset("digits28")
    torch.manual_seed(0)
    model = get_model("smallcnn", num_classes=10, in_channels=1)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    loss_fn = nn.CrossEntropyLoss()
    x_all = preset.normalize(train.images)
    y_all = train.labels
    model.train()
    t0 = time.perf_counter()
    for _ in range(epochs):
        order = torch.randperm(len(y_all))
        for s in range(0, len(y_all), batch_size):
            idx = order[s : s + batch_size]
            opt.zero_grad()
            loss_fn(model(x_all[idx]), y_all[idx]).backward()
            opt.step()
    return len(y_all) * epochs / (time.perf_counter() - t0)


def main() -> None:
    torch.set_num_threads(torch.get_num_threads())
    train, hold = demo_sets()
    epochs, batch = 3, 128
    # fit's own val carve-out is 10%: give the bare loop the same 90% for a like-for-like run
    cfg = TrainConfig(epochs=epochs, batch_size=batch, augment="none", patience=epochs)
    fit(train.subset(np.arange(400)), TrainConfig(epochs=1, augment="none"))  # pay imports once
    t0 = time.perf_counter()
    res = fit(train, cfg)
    fit_wall = time.perf_counter() - t0
    fit_train_only = res.images_per_second
    fit_with_val = len(res.history) * (len(train) - len(res.val)) / fit_wall
    bare = bare_loop(
        train.subset(np.arange(len(train) - len(res.val))),
        epochs=epochs,
        batch_size=batch,
        lr=cfg.lr,
    )

    t0 = time.perf_counter()
    demo = fit(train, TrainConfig())  # the default demo configuration (make demo)
    demo_wall = time.perf_counter() - t0
    acc = float(
        (predict_logits(demo.model, hold.images, demo.preset).argmax(1) == hold.labels)
        .float()
        .mean()
    )
    out = {
        "machine": {
            "cpu_threads": torch.get_num_threads(),
            "platform": platform.platform(),
            "torch": torch.__version__,
            "device": res.device,
        },
        "fit_vs_bare_loop": {
            "epochs": epochs,
            "batch_size": batch,
            "images": len(train) - len(res.val),
            "bare_loop_img_s": bare,
            "fit_img_s_training_only": fit_train_only,
            "fit_img_s_including_validation": fit_with_val,
            "ratio_training_only": fit_train_only / bare,
            "ratio_including_validation": fit_with_val / bare,
        },
        "demo_model": {
            "architecture": "smallcnn",
            "epochs_run": len(demo.history),
            "wall_seconds": demo_wall,
            "holdout_accuracy": acc,
            "holdout_n": len(hold),
            "target_accuracy": 0.97,
            "target_seconds": 120,
        },
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=2))
    f = out["fit_vs_bare_loop"]
    print(
        f"bare loop {f['bare_loop_img_s']:.0f} img/s | fit {f['fit_img_s_training_only']:.0f} "
        f"img/s (x{f['ratio_training_only']:.2f}), with validation "
        f"{f['fit_img_s_including_validation']:.0f} img/s (x{f['ratio_including_validation']:.2f})"
    )
    print(f"demo model: hold-out accuracy {acc:.4f} in {demo_wall:.1f} s")


if __name__ == "__main__":
    main()

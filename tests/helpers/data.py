"""The demo seed every test agrees on, and saving a trained model as an artifact."""

from __future__ import annotations

# The seed snapshot the tests' models are trained on: the first 600 demo digits, 480 train +
# 120 hold-out (class-balanced). Images after it are "unseen" traffic.
SEED_SIZE = 600


def save_smallcnn(res, out, **extra):
    """Save a FitResult of the smallcnn (1 channel) as an artifact; returns its sha256."""
    from quarkflow_core.ml.artifacts import save_artifact

    return save_artifact(
        out,
        model=res.model,
        architecture="smallcnn",
        classes=res.classes,
        in_channels=1,
        preset=res.preset,
        **extra,
    )

"""What every peer server shares: the same preprocessing as Quarkflow's ``imagenet224`` preset
(the numbers copied, no Quarkflow import: these run in their own venvs) and one ONNX Runtime
session with a fixed number of intra-op threads.

Settings come from the environment the benchmark sets: ``PEER_ONNX`` (the model file),
``PEER_THREADS`` (ORT intra-op threads, 2), ``PEER_MAX_BATCH`` (32), ``PEER_BATCH_WAIT_MS`` (5).
"""

from __future__ import annotations

import io
import os

import numpy as np
import onnxruntime as ort
from PIL import Image, ImageOps

SIZE = 224  # imagenet224: square bilinear resize to 224, RGB, /255, ImageNet mean/std
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32).reshape(1, 3, 1, 1)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32).reshape(1, 3, 1, 1)
CLASSES = [f"class{i}" for i in range(10)]
MAX_BATCH = int(os.environ.get("PEER_MAX_BATCH", "32"))
BATCH_WAIT_MS = float(os.environ.get("PEER_BATCH_WAIT_MS", "5"))


def session() -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = int(os.environ.get("PEER_THREADS", "2"))
    return ort.InferenceSession(
        os.environ["PEER_ONNX"], options, providers=["CPUExecutionProvider"]
    )


def decode(data: bytes) -> np.ndarray:
    """Image bytes -> uint8 (3, 224, 224), as Quarkflow's preset does for 8-bit images."""
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        img = ImageOps.exif_transpose(img)
        if img.mode != "RGB":
            img = img.convert("RGB")
        if img.size != (SIZE, SIZE):
            img = img.resize((SIZE, SIZE), Image.BILINEAR)
        return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)


def predict(sess: ort.InferenceSession, batch_uint8: np.ndarray) -> list[dict]:
    """uint8 (N, 3, 224, 224) -> top-5 per image (softmax)."""
    x = (batch_uint8.astype(np.float32) / 255.0 - MEAN) / STD
    logits = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    logits = logits - logits.max(axis=1, keepdims=True)
    probs = np.exp(logits)
    probs /= probs.sum(axis=1, keepdims=True)
    out = []
    for row in probs:
        order = np.argsort(-row)[:5]
        out.append(
            {
                "label": CLASSES[order[0]],
                "confidence": float(row[order[0]]),
                "topk": [{"label": CLASSES[i], "confidence": float(row[i])} for i in order],
            }
        )
    return out

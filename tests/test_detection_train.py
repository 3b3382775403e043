"""Detector training, artifacts, serving and export on real pixels (digits_on_photos), kept
small: 128 px images, a few dozen of them, 2 epochs of the default CPU detector."""

import hashlib

import numpy as np
import pytest
import torch
from PIL import Image as PILImage

from quarkflow_core.detection import assets
from quarkflow_core.detection.artifacts import (
    ArtifactIntegrityError,
    load_detector_artifact,
    save_detector_artifact,
)
from quarkflow_core.detection.data import DetectionSet, split_detection
from quarkflow_core.detection.export import export_detector_onnx
from quarkflow_core.detection.models import get_detector, list_detectors
from quarkflow_core.detection.predictor import DetectionPredictor
from quarkflow_core.detection.synth import digits_on_photos, encode_png
from quarkflow_core.detection.train import (
    DEFAULT_DETECTOR,
    DetectorConfig,
    detect,
    fit_detector,
)
from quarkflow_core.errors import InvalidInput

pytestmark = pytest.mark.unit
CLASSES = [str(i) for i in range(10)]
SIZE = 128
QUICK = {
    "architecture": DEFAULT_DETECTOR,
    "image_size": SIZE,
    "epochs": 2,
    "batch_size": 4,
    "num_threads": 1,  # steadier than 2 on a shared 2-core box; these models are tiny
    "val_fraction": 0.15,
}


@pytest.fixture(scope="module")
def data() -> DetectionSet:
    samples = digits_on_photos(48, seed=7, size=SIZE, digits=(1, 3), digit_px=(14, 64))
    return DetectionSet.from_samples(samples, CLASSES)


@pytest.fixture(scope="module")
def fitted(data, tmp_path_factory):
    """One uninterrupted run with checkpoints (its events kept for the progress test)."""
    events = []
    ckpt = tmp_path_factory.mktemp("ckpt_full")
    res = fit_detector(data, DetectorConfig(**QUICK), progress=events.append, checkpoint_dir=ckpt)
    return res, events, ckpt


@pytest.fixture(scope="module")
def artifact(fitted, tmp_path_factory):
    res, _, _ = fitted
    out = tmp_path_factory.mktemp("art") / "v1"
    sha = save_detector_artifact(
        out,
        model=res.model,
        architecture=res.config.architecture,
        classes=res.classes,
        config=res.config.to_dict(),
        score_threshold=0.3,
        metrics={"val_map50": res.summary()["val_map50"]},
        training={"history": res.history},
        dataset={"n": 48},
    )
    return out, sha


def test_fit_runs_checkpoints_and_reports(fitted, data):
    res, events, ckpt = fitted
    assert (ckpt / "checkpoint.pt").is_file()
    assert [h["epoch"] for h in res.history] == [1, 2]
    assert all(np.isfinite(h["train_loss"]) for h in res.history)
    stages = [e.stage for e in events]
    assert stages.count("epoch") == 2 and stages[-1] == "done" and "batch" in stages
    assert all(e.val_map is not None for e in events if e.stage == "epoch")
    s = res.summary()
    assert s["device"] == "cpu" and s["images_per_second"] > 0 and s["train_seconds"] > 0
    assert 1 <= s["best_epoch"] <= 2 and s["image_size"] == SIZE
    assert res.config.lr is not None and res.config.pretrained_backbone is True  # resolved
    assert len(res.val) + 41 == len(data)  # 15% of 48 held out for validation


def test_resume_after_interruption_gives_identical_weights(fitted, data, tmp_path):
    full, _, _ = fitted
    config = DetectorConfig(**QUICK)
    first = fit_detector(data, config, checkpoint_dir=tmp_path, stop_after_epoch=1)
    assert len(first.history) == 1
    resumed = fit_detector(data, config, checkpoint_dir=tmp_path)
    assert resumed.resumed_from_epoch == 1
    assert [h["train_loss"] for h in resumed.history] == [h["train_loss"] for h in full.history]
    want, got = full.model.state_dict(), resumed.model.state_dict()
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(want[k], got[k]), k
    with pytest.raises(InvalidInput, match="different training config"):
        fit_detector(data, DetectorConfig(**{**QUICK, "lr": 1e-3}), checkpoint_dir=tmp_path)


def test_artifact_round_trip_and_tamper_refused(artifact, fitted, data):
    path, sha = artifact
    loaded = load_detector_artifact(path, expected_sha256=sha)
    assert loaded.manifest["task"] == "detection"
    assert loaded.classes == CLASSES and loaded.score_threshold == 0.3
    assert loaded.architecture == DEFAULT_DETECTOR and loaded.image_size == SIZE
    images = data.images[:3]
    want = detect(fitted[0].model, images, score_floor=0.0)
    got = detect(loaded.model, images, score_floor=0.0)
    for a, b in zip(want, got, strict=True):
        np.testing.assert_array_equal(a["boxes"], b["boxes"])
        np.testing.assert_array_equal(a["scores"], b["scores"])
    with pytest.raises(ArtifactIntegrityError):
        load_detector_artifact(path, expected_sha256="0" * 64)
    with pytest.raises(InvalidInput, match="not empty"):
        save_detector_artifact(
            path,
            model=loaded.model,
            architecture=DEFAULT_DETECTOR,
            classes=CLASSES,
            config={},
            score_threshold=0.5,
        )


def test_tampered_weights_are_refused(artifact, tmp_path):
    import shutil

    path, _ = artifact
    copy = tmp_path / "copy"
    shutil.copytree(path, copy)
    with open(copy / "weights.pt", "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(ArtifactIntegrityError, match="modified"):
        load_detector_artifact(copy)


def test_predictor_returns_boxes_in_original_pixels(artifact, data):
    path, sha = artifact
    pred = DetectionPredictor.from_artifact(path, version=3)
    pred.warm_up(1)
    info = pred.describe()
    assert info["architecture"] == DEFAULT_DETECTOR and info["backend"] == "eager"
    assert info["sha256"] == sha and info["version"] == 3 and info["classes"] == CLASSES
    assert pred.threshold() == 0.3 and pred.threshold(0.6) == 0.6
    # a non-square image 2.3x the model's size: boxes must span its own pixels, not 128 px
    big = np.asarray(
        PILImage.fromarray(data.images[0]).resize((300, 200), PILImage.Resampling.BILINEAR)
    )
    raw = detect(load_detector_artifact(path).model, [big], score_floor=0.0)[0]
    assert len(raw["boxes"]) > 0
    assert raw["boxes"][:, 2].max() > SIZE * 1.2 and raw["boxes"][:, 3].max() > SIZE * 1.1
    assert (raw["boxes"][:, [0, 2]] <= 300).all() and (raw["boxes"][:, [1, 3]] <= 200).all()
    found = pred.predict_array(big)
    scores = [b["score"] for b in found]
    assert scores == sorted(scores, reverse=True) and all(s >= 0.05 for s in scores)
    for b in found:
        x1, y1, x2, y2 = b["box"]
        assert b["label"] in CLASSES and 0 <= x1 < x2 <= 300 and 0 <= y1 < y2 <= 200
    sample = digits_on_photos(1, seed=99, size=SIZE, digit_px=(14, 64))[0]
    assert pred.predict_bytes(encode_png(sample)) == pred.predict_array(sample.image)
    with pytest.raises(InvalidInput):
        pred.predict_bytes(b"not an image")
    with pytest.raises(InvalidInput):
        DetectionPredictor.from_artifact(path, backend="onnx")  # not exported yet


def test_onnx_export_parity_and_onnx_predictor(artifact, data, tmp_path):
    import shutil

    src, _ = artifact
    path = tmp_path / "exported"
    shutil.copytree(src, path)
    loaded = load_detector_artifact(path)
    # an odd, non-square size too: the graph must resize exactly as eager torchvision does
    odd = np.asarray(PILImage.fromarray(data.images[4]).resize((257, 199)))
    report = export_detector_onnx(loaded, path, sample_images=[*data.images[:4], odd])
    assert report["parity_max_abs_diff"] <= 1e-3 and report["parity_unmatched"] == 0
    assert (path / "model.onnx").is_file()
    reloaded = load_detector_artifact(path)  # the export is now in the manifest
    assert reloaded.manifest["exports"]["onnx"]["files"] == ["model.onnx"]
    onnx_pred = DetectionPredictor.from_artifact(path, backend="onnx")
    torch_pred = DetectionPredictor.from_artifact(path, backend="torch")
    assert onnx_pred.describe()["backend"] == "onnxruntime"
    img = data.images[5]
    a, b = torch_pred.predict_array(img), onnx_pred.predict_array(img)
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x["label"] == y["label"] and abs(x["score"] - y["score"]) <= 1e-3
        assert np.abs(np.subtract(x["box"], y["box"])).max() <= 0.5


def test_assets_are_hash_checked(monkeypatch):
    path = assets.mobilenet_v2_weights()
    assert hashlib.sha256(path.read_bytes()).hexdigest() == assets.WEIGHTS_SHA256
    tiles = assets.deepforest_tiles()
    assert [len(b) for _, _, b in tiles] == [574, 279, 61, 37]
    for _name, image, boxes in tiles:
        h, w = image.shape[:2]
        assert image.dtype == np.uint8 and image.shape[2] == 3
        assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 2] <= w).all()
        assert (boxes[:, 3] > boxes[:, 1]).all() and (boxes[:, 3] <= h).all()
    monkeypatch.setattr(assets, "WEIGHTS_SHA256", "0" * 64)
    with pytest.raises(InvalidInput, match="changed or corrupted"):
        assets.mobilenet_v2_weights()
    monkeypatch.setattr(assets, "WEIGHTS_PACKAGE", "no_such_weights_package")
    with pytest.raises(InvalidInput, match="not installed"):
        assets.mobilenet_v2_weights()


def test_pretrained_backbone_loads_imagenet_weights():
    net = get_detector("fasterrcnn_mnv2_fpn", num_classes=2, pretrained_backbone=True)
    state = torch.load(assets.mobilenet_v2_weights(), map_location="cpu", weights_only=True)
    got = net.backbone.body.state_dict()
    assert torch.equal(got["0.0.weight"], state["features.0.0.weight"])
    assert not next(net.backbone.body.parameters()).requires_grad  # early blocks frozen


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"architecture": "yolo9000"}, "fasterrcnn_mnv2_fpn, ssdlite320"),
        ({"epochs": 0}, "epochs"),
        ({"augment": "rotate"}, "augment"),
        ({"monitor": "accuracy"}, "monitor"),
        ({"val_fraction": 0.7}, "val_fraction"),
        ({"architecture": "ssdlite320", "pretrained_backbone": True}, "pretrained"),
        ({"epochs": 3, "min_epochs": 5}, "min_epochs"),
        ({"lr": -1.0}, "lr"),
    ],
)
def test_bad_config_is_refused(options, match):
    with pytest.raises(InvalidInput, match=match):
        DetectorConfig(**options).validate()


def test_config_round_trip_and_registry():
    with pytest.raises(InvalidInput, match="unknown detector training options"):
        DetectorConfig.from_dict({"epochs": 1, "learning_rate": 0.1})
    c = DetectorConfig.from_dict({"epochs": 1})
    assert DetectorConfig.from_dict(c.to_dict()).fingerprint() == c.fingerprint()
    assert {"fasterrcnn_mnv2_fpn", "ssdlite320"} <= set(list_detectors())
    with pytest.raises(InvalidInput, match="valid names"):
        get_detector("nope", num_classes=3)


def test_detection_set_checks_and_split(data):
    with pytest.raises(InvalidInput, match="degenerate"):
        DetectionSet(
            images=[data.images[0]],
            boxes=[np.array([[5, 5, 5, 9]], dtype=np.float32)],
            labels=[np.array([1])],
            classes=CLASSES,
        )
    with pytest.raises(InvalidInput, match="out of range"):
        DetectionSet(
            images=[data.images[0]],
            boxes=[np.array([[1, 1, 5, 9]])],
            labels=[np.array([10])],
            classes=CLASSES,
        )
    keep, held = split_detection(len(data), 0.25, seed=3)
    assert len(held) == 12 and not set(keep) & set(held)
    assert np.array_equal(held, split_detection(len(data), 0.25, seed=3)[1])
    sub = data.subset(held)
    assert len(sub) == 12 and sub.images[0] is data.images[held[0]]

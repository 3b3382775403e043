"""ML core on real data (scikit-learn's digits; the demo MNIST set for the service test)."""

import json

import numpy as np
import pytest
import torch
from helpers.data import save_smallcnn
from scipy.stats import binomtest
from sqlalchemy import select

from quarkflow_core.errors import InvalidInput
from quarkflow_core.ml.artifacts import (
    ArtifactIntegrityError,
    load_artifact,
    manifest_sha256,
)
from quarkflow_core.ml.calibration import fit_temperature, threshold_for_accuracy
from quarkflow_core.ml.compare import BETTER, SAME, compare, mcnemar_exact
from quarkflow_core.ml.data import sklearn_digits
from quarkflow_core.ml.engine import predict_logits
from quarkflow_core.ml.evaluate import classification_report, stratified_kfold
from quarkflow_core.ml.models import get_model, list_models
from quarkflow_core.ml.train import TrainConfig, class_weight_tensor, fit
from quarkflow_core.ml.transforms import eval_preset
from quarkflow_core.schema import RunStatus, TrainingRun
from quarkflow_core.training_runs import train_from_snapshot

pytestmark = pytest.mark.unit
PRESET = eval_preset("digits28")
QUICK = {"epochs": 2, "batch_size": 64, "augment": "none", "num_threads": 2}


@pytest.fixture(scope="module")
def digits():
    return sklearn_digits(PRESET)


@pytest.fixture(scope="module")
def small(digits):
    idx = np.arange(0, len(digits), 3)  # ~600 real digits, all classes
    return digits.subset(idx)


def test_unknown_architecture_lists_valid_names():
    with pytest.raises(InvalidInput) as err:
        get_model("resnet9000", num_classes=10)
    for name in ("smallcnn", "resnet18", "mobilenet_v3_small", "efficientnet_lite0"):
        assert name in err.value.detail
    assert {"smallcnn", "resnet18", "mobilenet_v3_small"} <= set(list_models())


def test_loss_goes_down_on_tiny_real_data(small):
    res = fit(small, TrainConfig(**{**QUICK, "epochs": 4}))
    losses = [h["train_loss"] for h in res.history]
    assert losses[-1] < losses[0] * 0.6
    assert res.history[-1]["val_accuracy"] > 0.5  # chance is 0.1


def test_fit_is_seeded_and_reproducible(small):
    a = fit(small, TrainConfig(**QUICK, seed=3)).model.state_dict()
    b = fit(small, TrainConfig(**QUICK, seed=3)).model.state_dict()
    c = fit(small, TrainConfig(**QUICK, seed=4)).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_resumed_training_ends_where_an_uninterrupted_run_does(small, tmp_path):
    cfg = TrainConfig(**{**QUICK, "epochs": 3, "augment": "light"})
    straight = fit(small, cfg).model.state_dict()
    first = fit(small, cfg, checkpoint_dir=tmp_path, stop_after_epoch=1)
    assert len(first.history) == 1
    resumed = fit(small, cfg, checkpoint_dir=tmp_path)
    assert resumed.resumed_from_epoch == 1 and len(resumed.history) == 3
    assert all(torch.equal(straight[k], resumed.model.state_dict()[k]) for k in straight)
    with pytest.raises(InvalidInput, match="different training config"):
        fit(small, TrainConfig(**{**QUICK, "epochs": 5}), checkpoint_dir=tmp_path)


def test_progress_events_reach_the_callback(small):
    events = []
    fit(small, TrainConfig(**QUICK), progress=events.append)
    stages = [e.stage for e in events]
    assert stages.count("epoch") == 2 and stages[-1] == "done" and "batch" in stages


def test_class_weights_favour_rare_classes():
    w = class_weight_tensor(torch.tensor([0] * 90 + [1] * 10), 2)
    assert w[1] / w[0] == pytest.approx(9.0)


def test_ece_of_a_perfectly_calibrated_synthetic_case_is_about_zero():
    gen = torch.Generator().manual_seed(0)
    n, c = 40_000, 4
    conf = 0.5 + 0.5 * torch.rand(n, generator=gen)  # the predicted class is always the max
    pred = torch.randint(0, c, (n,), generator=gen)
    correct = torch.rand(n, generator=gen) < conf  # right exactly as often as it says
    labels = torch.where(correct, pred, (pred + 1) % c)
    probs = torch.full((n, c), 0.0)
    probs[torch.arange(n), pred] = conf
    probs[torch.arange(n), (pred + 1) % c] = (1 - conf) / 2
    probs[torch.arange(n), (pred + 2) % c] = (1 - conf) / 2
    report = classification_report(probs, labels, [str(i) for i in range(c)])
    assert report["ece"] < 0.01
    overconfident = probs.clone()
    overconfident[torch.arange(n), pred] = 1.0
    overconfident[torch.arange(n), (pred + 1) % c] = 0.0
    overconfident[torch.arange(n), (pred + 2) % c] = 0.0
    assert (
        classification_report(overconfident, labels, [str(i) for i in range(c)])["ece"] > 0.2
    )  # claims 1.0, right 75% of the time


def test_mcnemar_matches_scipys_binomial_test_on_a_known_table():
    # 10 items only A gets right, 2 only B gets right, 30 both, 8 neither
    a = np.array([True] * 10 + [False] * 2 + [True] * 30 + [False] * 8)
    b = np.array([False] * 10 + [True] * 2 + [True] * 30 + [False] * 8)
    result = mcnemar_exact(a, b)
    assert (result["only_a_correct"], result["only_b_correct"]) == (10, 2)
    assert result["p_value"] == pytest.approx(binomtest(2, 12, 0.5).pvalue)
    assert result["p_value"] == pytest.approx(0.0386, abs=1e-4)


def test_comparison_verdicts():
    gen = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 3, (600,), generator=gen)
    perfect = torch.nn.functional.one_hot(labels, 3).float() * 0.9 + 0.1 / 3
    noisy = perfect.clone()
    flip = torch.rand(600, generator=gen) < 0.2
    noisy[flip] = perfect[flip].roll(1, dims=1)
    better = compare(labels, noisy, perfect, ["a", "b", "c"])
    assert better["verdict"] == BETTER and better["mcnemar"]["p_value"] < 1e-6
    lo, hi = better["accuracy_delta_ci95"]
    assert 0 < lo < better["accuracy_delta"] < hi
    assert compare(labels, perfect, noisy, ["a", "b", "c"])["verdict"] == "worse"
    assert compare(labels, perfect, perfect.clone(), ["a", "b", "c"])["verdict"] == SAME


def test_kfold_is_stratified_and_disjoint(digits):
    folds = stratified_kfold(digits.labels, k=5, seed=0)
    tests = [set(t.tolist()) for _, t in folds]
    assert sum(len(t) for t in tests) == len(digits)
    assert set().union(*tests) == set(range(len(digits)))
    for (train, test), t in zip(folds, tests, strict=True):
        assert not set(train.tolist()) & t
        counts = torch.bincount(digits.labels[test], minlength=10)
        expected = torch.bincount(digits.labels, minlength=10) / 5
        assert torch.all((counts - expected).abs() <= 1)


def test_temperature_scaling_recovers_a_known_temperature():
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(20_000, 5, generator=gen) * 4
    labels = torch.multinomial(torch.softmax(logits / 2.0, 1), 1, generator=gen).squeeze(1)
    assert fit_temperature(logits, labels) == pytest.approx(2.0, rel=0.05)
    # every validation image right (a small split): nothing to calibrate against, T stays 1
    # (the fit would run off to T -> 0 and used to stop the training run)
    assert fit_temperature(logits[:12], logits[:12].argmax(1)) == 1.0


def test_review_threshold_for_target_accuracy():
    probs = torch.tensor([[0.99, 0.01], [0.95, 0.05], [0.7, 0.3], [0.6, 0.4]])
    labels = torch.tensor([0, 0, 0, 1])  # the 0.6 prediction is wrong
    t = threshold_for_accuracy(probs, labels, target=0.99)
    assert t["threshold"] == pytest.approx(0.7) and t["coverage"] == 0.75


def test_artifact_round_trip_and_tamper_detection(small, tmp_path):
    res = fit(small, TrainConfig(**QUICK))
    out = tmp_path / "art"
    sha = save_smallcnn(
        res,
        out,
        temperature=1.5,
        metrics={"holdout": {"accuracy": 0.5}},
        training=res.summary(),
    )
    assert manifest_sha256(out) == sha
    manifest = json.loads((out / "manifest.json").read_text())
    for key in ("architecture", "classes", "preprocess", "temperature", "code", "files"):
        assert key in manifest
    assert manifest["code"]["torch"] == torch.__version__
    loaded = load_artifact(out, expected_sha256=sha)
    assert loaded.preset == res.preset and loaded.temperature == 1.5
    x = small.images[:16]
    assert torch.equal(
        predict_logits(loaded.model, x, PRESET), predict_logits(res.model, x, PRESET)
    )

    with pytest.raises(InvalidInput, match="not empty"):
        save_smallcnn(res, out)
    with pytest.raises(ArtifactIntegrityError, match="registered"):
        load_artifact(out, expected_sha256="0" * 64)
    weights = out / "weights.pt"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ArtifactIntegrityError, match=r"weights\.pt has sha256"):
        load_artifact(out)


def test_stray_file_in_artifact_is_refused(small, tmp_path):
    res = fit(small, TrainConfig(**{**QUICK, "epochs": 1}))
    save_smallcnn(res, tmp_path)
    (tmp_path / "evil.pt").write_bytes(b"x")
    with pytest.raises(ArtifactIntegrityError, match="not in the manifest"):
        load_artifact(tmp_path)


@pytest.fixture
def seeded(db_session, tmp_path):
    """(storage, seed report) for a small seed set on the parametrized database."""
    from quarkflow_core.demo_data import seed_demo
    from quarkflow_core.storage import LocalStorage

    storage = LocalStorage(tmp_path / "store")
    return storage, seed_demo(session=db_session, storage=storage, limit=300)


@pytest.mark.integration
def test_train_from_snapshot_records_the_run(db_session, seeded, tmp_path):
    storage, report = seeded
    outcome = train_from_snapshot(
        session=db_session,
        storage=storage,
        snapshot_id=report.snapshot_id,
        config=TrainConfig(**QUICK),
        out_dir=tmp_path / "art",
    )
    run = db_session.scalar(select(TrainingRun).where(TrainingRun.id == outcome.run_id))
    assert run.status is RunStatus.SUCCEEDED and run.finished_at is not None
    assert run.metrics["accuracy"] == outcome.metrics["holdout"]["accuracy"]
    assert len(run.progress["history"]) == 2
    loaded = load_artifact(outcome.artifact_dir, expected_sha256=outcome.manifest_sha256)
    assert loaded.manifest["dataset"]["snapshot_id"] == report.snapshot_id
    assert outcome.metrics["holdout"]["n"] == 60  # the fixed 20% hold-out of 300


@pytest.mark.integration
def test_failed_training_is_recorded_as_failed(db_session, seeded, tmp_path):
    storage, report = seeded
    for key in storage.list("images/"):  # the images vanish from storage
        storage.delete(key)
    with pytest.raises(Exception, match="no object"):
        train_from_snapshot(
            session=db_session,
            storage=storage,
            snapshot_id=report.snapshot_id,
            config=TrainConfig(**QUICK),
            out_dir=tmp_path / "art",
        )
    run = db_session.scalars(select(TrainingRun).order_by(TrainingRun.id.desc())).first()
    assert run.status is RunStatus.FAILED and "no object" in run.error
    assert not (tmp_path / "art").exists()

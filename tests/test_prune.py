"""Pruning on real data: structured pruning really shrinks smallcnn / resnet18 / mobilenet,
recovery brings a trained smallcnn back after pruning, unstructured sparsity is what was asked,
and a pruned structure survives a weights_only save/load."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from quarkflow_core.errors import InvalidInput
from quarkflow_core.ml import prune
from quarkflow_core.ml.data import sklearn_digits, stratified_split
from quarkflow_core.ml.engine import predict_logits, train_epochs
from quarkflow_core.ml.models import count_parameters, get_model
from quarkflow_core.ml.transforms import eval_preset

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def digits():
    preset = eval_preset("digits28")
    data = sklearn_digits(preset)
    train_idx, hold_idx = stratified_split(data.labels, fraction=0.25, seed=0)
    return preset, data.subset(train_idx), data.subset(hold_idx)


@pytest.fixture(scope="module")
def trained_smallcnn(digits):
    preset, train, _ = digits
    torch.manual_seed(0)
    model = get_model("smallcnn", num_classes=10, in_channels=1)
    train_epochs(model, train, preset, epochs=2, lr=3e-3, batch_size=64, device=torch.device("cpu"))
    return model.eval()


def accuracy(model, data, preset) -> float:
    pred = predict_logits(model, data.images, preset, device=torch.device("cpu")).argmax(1)
    return float((pred == data.labels).float().mean())


def macs_params(model, x):
    import torch_pruning as tp

    return tp.utils.count_ops_and_params(model.eval(), x)


def test_structured_smallcnn_halves_every_layer_but_the_classifier(digits):
    preset, _, hold = digits
    torch.manual_seed(0)
    model = get_model("smallcnn", num_classes=10, in_channels=1)
    x = preset.normalize(hold.images[:2])
    macs0, params0 = macs_params(model, x)

    pruned = prune.prune_structured(model, x, ratio=0.5)

    macs1, params1 = macs_params(pruned, x)
    # both in- and out-channels halve, so conv MACs and weights drop to ~1/4
    assert 0.2 < params1 / params0 < 0.32
    assert 0.2 < macs1 / macs0 < 0.32
    before, after = prune.channel_counts(model), prune.channel_counts(pruned)
    head = list(before)[-1]
    assert after.pop(head) == before.pop(head) == 10  # classifier untouched
    assert after == {name: n // 2 for name, n in before.items()}  # every other layer halved
    assert pruned(preset.normalize(hold.images[:5])).shape == (5, 10)
    assert count_parameters(model) == params0  # original left intact


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v3_small"])
def test_structured_imagenet_archs_shrink(arch):
    torch.manual_seed(0)
    model = get_model(arch, num_classes=7)
    x = torch.randn(1, 3, 64, 64)  # structure only: a small input keeps tracing quick
    macs0, params0 = macs_params(model, x)

    pruned = prune.prune_structured(model, x, ratio=0.5).eval()

    macs1, params1 = macs_params(pruned, x)
    assert 0.2 < params1 / params0 < 0.4
    assert 0.2 < macs1 / macs0 < 0.4
    with torch.no_grad():
        assert pruned(torch.randn(3, 3, 64, 64)).shape == (3, 7)
    heads = [m for m in pruned.modules() if isinstance(m, nn.Linear) and m.out_features == 7]
    assert len(heads) == 1


def test_explicit_ignored_layers_and_bad_ratio(digits):
    preset, _, hold = digits
    model = get_model("smallcnn", num_classes=10, in_channels=1)
    x = preset.normalize(hold.images[:1])
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(linears) >= 2
    pruned = prune.prune_structured(model, x, ratio=0.3, ignored_layers=linears)
    hidden = next(n for n, m in model.named_modules() if m is linears[0])
    assert prune.channel_counts(pruned)[hidden] == linears[0].out_features  # kept
    with pytest.raises(InvalidInput):
        prune.prune_structured(model, x, ratio=1.0)
    with pytest.raises(InvalidInput, match="not part of the model"):
        prune.prune_structured(model, x, ratio=0.5, ignored_layers=[nn.Linear(2, 2)])


def test_recalibration_and_recovery_restore_accuracy(digits, trained_smallcnn):
    preset, train, hold = digits
    acc_trained = accuracy(trained_smallcnn, hold, preset)
    assert acc_trained > 0.85

    pruned = prune.prune_structured(trained_smallcnn, preset.normalize(hold.images[:1]), ratio=0.5)
    acc_pruned = accuracy(pruned, hold, preset)
    prune.recalibrate_bn(pruned, train.images, preset)
    acc_recal = accuracy(pruned, hold, preset)
    losses = prune.recover(
        pruned, train, preset, epochs=1, batch_size=64, device=torch.device("cpu")
    )
    acc_recovered = accuracy(pruned, hold, preset)

    assert acc_pruned < acc_trained - 0.2  # raw 50% pruning breaks the network...
    assert acc_recal > acc_pruned + 0.2  # ...fresh BN statistics fix most of it...
    assert acc_recovered >= acc_trained - 0.05  # ...and a short fine-tune the rest
    assert len(losses) == 1 and losses[0] > 0
    assert accuracy(trained_smallcnn, hold, preset) == acc_trained  # original untouched


def test_unstructured_sparsity_matches_amount_but_nothing_shrinks(digits, trained_smallcnn):
    preset, _, hold = digits
    sparse = prune.prune_unstructured(trained_smallcnn, amount=0.6)

    assert abs(prune.weight_sparsity(sparse) - 0.6) < 0.005
    assert prune.weight_sparsity(trained_smallcnn) < 0.01
    assert not any(k.endswith(("_orig", "_mask")) for k in sparse.state_dict())  # permanent
    assert count_parameters(sparse) == count_parameters(trained_smallcnn)
    assert accuracy(sparse, hold, preset) > 0.5
    assert "NOT speed up" in prune.prune_unstructured.__doc__
    report = prune.unstructured_report(0.6, {"params": 1}, {"params": 1}, 0.6)
    assert "do not improve" in report.to_dict()["notes"][0]


def test_measure_and_report(digits, trained_smallcnn):
    preset, _, hold = digits
    x = preset.normalize(hold.images[:1])
    pruned = prune.prune_structured(trained_smallcnn, x, ratio=0.5)
    kwargs = dict(images_uint8=hold.images, labels=hold.labels, repeats=2, warmup=1)
    before = prune.measure(trained_smallcnn, preset, **kwargs)
    after = prune.measure(pruned, preset, **kwargs)

    for m in (before, after):
        assert m["latency_ms_b1"] > 0 and m["latency_ms_b32"] > 0
        assert 0.0 <= m["accuracy"] <= 1.0
    assert after["params"] < 0.32 * before["params"]
    assert after["macs"] < 0.32 * before["macs"]
    assert after["bytes"] < 0.4 * before["bytes"]
    assert before["accuracy"] == pytest.approx(accuracy(trained_smallcnn, hold, preset))

    report = prune.structured_report(0.5, before, after).to_dict()
    json.dumps(report)
    assert report["accuracy_drop"] == pytest.approx(before["accuracy"] - after["accuracy"])
    assert report["params_ratio"] < 0.32 and report["speedup_b1"] > 0


@pytest.mark.parametrize(
    ("arch", "in_channels", "shape"),
    [("smallcnn", 1, (2, 1, 28, 28)), ("mobilenet_v3_small", 3, (2, 3, 64, 64))],
)
def test_pruned_state_round_trip_weights_only(tmp_path, arch, in_channels, shape):
    torch.manual_seed(0)
    model = get_model(arch, num_classes=5, in_channels=in_channels)
    x = torch.randn(*shape)
    pruned = prune.prune_structured(model, x[:1], ratio=0.4).eval()
    path = tmp_path / "pruned.pt"
    torch.save(prune.pruned_state(pruned), path)

    state = torch.load(path, map_location="cpu", weights_only=True)
    loaded = prune.load_pruned(arch, 5, in_channels, state)

    assert prune.channel_counts(loaded) == prune.channel_counts(pruned)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), pruned(x), rtol=0, atol=0)


def test_load_pruned_rejects_foreign_state():
    with pytest.raises(InvalidInput, match="format"):
        prune.load_pruned("smallcnn", 10, 1, {"weights": 1})

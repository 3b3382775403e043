"""The serving backend: which one ``QF_SERVING_BACKEND`` picks for which artifact on which
machine, the GPU path's fallback to the CPU when CUDA cannot run the model (for real on a
machine without a GPU: torch fails to start the model there), the device backend's uint8 path
against the CPU's, and what /readyz reports."""

from __future__ import annotations

import functools
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from helpers.serving import local_deploy

from app.api import create_app
from quarkflow_core.demo_data import demo_pngs
from quarkflow_core.errors import InvalidInput
from quarkflow_core.ml.artifacts import load_artifact
from quarkflow_core.ml.backends import (
    GPU_BATCHING,
    BackendUnavailable,
    TorchDeviceBackend,
    choose_backend,
    cuda_status,
    serving_batching,
)
from quarkflow_core.ml.export import load_backend
from quarkflow_core.ml.variants import export_artifact
from quarkflow_core.predictor import Predictor
from quarkflow_core.service import PredictionService

GPU = (True, "Pretend GPU")
NO_GPU = (False, "no CUDA device is visible")


def _probe(answer):
    return lambda: answer


@pytest.mark.parametrize(
    ("requested", "has_onnx", "requires", "cuda", "kind", "fallback"),
    [
        ("auto", True, None, GPU, "cuda", False),
        ("auto", True, None, NO_GPU, "onnxruntime", False),
        ("auto", False, None, NO_GPU, "eager", False),
        ("cuda", True, None, GPU, "cuda", False),
        ("cuda", True, None, NO_GPU, "onnxruntime", True),
        ("cuda", False, None, NO_GPU, "eager", True),
        ("eager", True, None, GPU, "eager", False),
        ("onnxruntime", True, None, GPU, "onnxruntime", False),
        # an INT8 variant runs only on ONNX Runtime, GPU or not, whatever was asked
        ("auto", True, "onnxruntime", GPU, "onnxruntime", False),
        ("cuda", True, "onnxruntime", GPU, "onnxruntime", True),
        ("eager", True, "onnxruntime", NO_GPU, "onnxruntime", True),
    ],
)
def test_the_choice_follows_the_setting_the_artifact_and_the_machine(
    requested, has_onnx, requires, cuda, kind, fallback
):
    choice = choose_backend(requested, has_onnx=has_onnx, requires=requires, cuda=_probe(cuda))
    assert choice.kind == kind
    assert (choice.fallback is not None) is fallback
    assert choice.device.startswith("cuda:0 (Pretend GPU)" if kind == "cuda" else "cpu")
    if fallback:
        assert requested in choice.fallback


def test_impossible_choices_are_refused_by_name():
    with pytest.raises(InvalidInput, match="unknown serving backend 'tpu'"):
        choose_backend("tpu", has_onnx=True, cuda=_probe(GPU))
    with pytest.raises(InvalidInput, match="no ONNX export"):
        choose_backend("onnxruntime", has_onnx=False, cuda=_probe(GPU))
    with pytest.raises(InvalidInput, match=r"no model\.onnx"):
        choose_backend("auto", has_onnx=False, requires="onnxruntime", cuda=_probe(GPU))


def test_the_machine_probe_agrees_with_torch():
    usable, detail = cuda_status()
    assert usable is torch.cuda.is_available()
    if not usable:
        assert "CUDA" in detail


def test_a_gpu_gets_bigger_batches_the_cpu_keeps_the_settings():
    assert serving_batching("onnxruntime", max_batch=32, max_wait_ms=1.0) == (32, 1.0)
    assert serving_batching("cuda", max_batch=32, max_wait_ms=1.0) == GPU_BATCHING
    assert serving_batching("cuda", max_batch=512, max_wait_ms=5.0) == (512, 5.0)


@functools.cache
def _digits(n: int = 24) -> np.ndarray:
    from quarkflow_core.ml.data import decode
    from quarkflow_core.ml.transforms import eval_preset

    pngs, _ = demo_pngs(n)
    preset = eval_preset("digits28")
    return np.stack([decode(p, preset) for p in pngs])  # (N, C, H, W) uint8


def test_the_device_backend_normalizes_uint8_on_the_device_like_the_cpu(trained_artifacts):
    """The GPU backend's code path (uint8 in, normalized where the model is, channels-last),
    run on the CPU device here in fp32: the same logits as the eager CPU backend."""
    loaded = load_artifact(trained_artifacts["strong"])
    batch = _digits()
    device = TorchDeviceBackend(loaded.model, device="cpu", example_shape=(1, 1, 28, 28))
    cpu = load_backend("eager", loaded.model)
    reference = cpu.logits(loaded.preset.normalize(torch.from_numpy(batch)).numpy())
    got = device.logits_uint8(batch, loaded.preset.normalize)
    assert device.name == "eager" and not device.half
    np.testing.assert_allclose(got, reference, atol=1e-4)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a usable GPU")
def test_a_model_that_cannot_start_on_cuda_falls_back_to_the_cpu(trained_artifacts, tmp_path):
    """The probe says a GPU is there (as a broken or busy one would); torch then really fails
    to put the model on it, and the predictor serves on the CPU, saying why."""
    with pytest.raises(BackendUnavailable, match="did not start on cuda"):
        TorchDeviceBackend(
            load_artifact(trained_artifacts["strong"]).model, example_shape=(1, 1, 28, 28)
        )
    path = trained_artifacts["strong"]
    pretend = Predictor.from_artifact(path, version=1, backend="auto", cuda=_probe(GPU))
    plain = Predictor.from_artifact(path, version=1, backend="eager")
    assert pretend.backend_name == "eager" and pretend.fallback and pretend.device == "cpu"
    assert "did not start on cuda" in pretend.backend_note
    np.testing.assert_allclose(
        pretend.probabilities(_digits()), plain.probabilities(_digits()), atol=1e-6
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_a_gpu_the_model_serves_there_with_the_cpu_answers(trained_artifacts):
    path = trained_artifacts["strong"]
    gpu = Predictor.from_artifact(path, version=1, backend="auto")
    cpu = Predictor.from_artifact(path, version=1, backend="eager")
    assert gpu.backend_name == "cuda" and gpu.device.startswith("cuda:0")
    agree = gpu.probabilities(_digits()).argmax(1) == cpu.probabilities(_digits()).argmax(1)
    assert agree.all()


def test_a_gpu_model_gets_the_gpu_batches_unless_they_were_set(tmp_path):
    dep = local_deploy(tmp_path, None)
    for overrides, on_gpu in (
        ({}, GPU_BATCHING),
        ({"serving_max_batch": 16}, (16, GPU_BATCHING[1])),
    ):
        service = PredictionService(dep.settings(**overrides))
        try:
            cpu = (service.batcher.max_batch, service.batcher.max_wait_s * 1000)
            service._tune_batching(SimpleNamespace(backend_name="cuda"))
            assert (service.batcher.max_batch, service.batcher.max_wait_s * 1000) == on_gpu
            service._tune_batching(SimpleNamespace(backend_name="onnxruntime"))
            assert (service.batcher.max_batch, service.batcher.max_wait_s * 1000) == cpu
        finally:
            service.stop()


def test_readyz_says_which_backend_serves_and_why_not_the_one_asked_for(
    trained_artifacts, tmp_path
):
    """QF_SERVING_BACKEND=cuda on this machine: served on the CPU (ONNX Runtime, the
    artifact's export), /readyz saying so, and predictions work."""
    artifact = tmp_path / "artifact"
    shutil.copytree(trained_artifacts["strong"], artifact)
    export_artifact(load_artifact(artifact), fmt="onnx", images=torch.from_numpy(_digits()))
    dep = local_deploy(tmp_path, artifact)
    app = create_app(dep.settings(serving_backend="cuda"), with_demo=False)
    with TestClient(app) as client:
        model = client.get("/readyz").json()["checks"]["model"]
        pngs, _ = demo_pngs(4)
        r = client.post(
            "/api/v1/predictions",
            files={"file": ("a.png", pngs[0], "image/png")},
            headers=dep.auth("expert"),
        )
    assert r.status_code == 200, r.text
    if torch.cuda.is_available():
        assert model["backend"] == "cuda" and "fallback" not in model
    else:
        assert model["backend"] == "onnxruntime" and model["device"] == "cpu"
        assert model["batching"]["max_batch"] == 32  # the CPU's: the settings' own
        assert model["fallback"] is True
        assert "cuda was asked for" in model["backend_note"]

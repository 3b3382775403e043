"""The Prefect team configuration in deploy/prefect parses and points at real flows."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[1]


def test_prefect_yaml_entrypoints_exist_and_retrain_goes_to_gpu_nodes():
    spec = yaml.safe_load((ROOT / "deploy/prefect/prefect.yaml").read_text())
    names = {d["name"]: d for d in spec["deployments"]}
    assert set(names) == {
        "retrain",
        "batch_predict",
        "promote",
        "label_trigger",
        "labelstudio_sync",
    }
    for dep in names.values():
        path, func = dep["entrypoint"].split(":")
        module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
        assert callable(getattr(module, func))
    assert names["retrain"]["work_pool"]["name"] == "gpu-k8s"
    assert names["retrain"]["schedules"][0]["active"] is False  # off by default
    template = json.loads((ROOT / "deploy/prefect/gpu-work-pool.json").read_text())
    pod = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    assert "cloud.google.com/gke-accelerator" in pod["nodeSelector"]
    assert "nvidia.com/gpu" in pod["containers"][0]["resources"]["limits"]
    assert set(template["variables"]["properties"]) >= {"image", "gpu_count", "accelerator"}

"""The Prefect team configuration in deploy/prefect parses and points at real flows."""

from __future__ import annotations

import importlib
import json
import sys
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


# prefect-kubernetes insists on these two Job fields at the pod-spec path (its own default
# template has them there); the API server drops them, a strict schema check would refuse them.
PREFECT_POD_SPEC_QUIRKS = ("parallelism", "completions")


def test_the_committed_work_pool_templates_are_what_the_generator_writes():
    sys.path.insert(0, str(ROOT / "deploy/prefect"))
    try:
        import make_work_pools
    finally:
        sys.path.pop(0)
    for gpu, name in ((True, "gpu"), (False, "cpu")):
        path = ROOT / f"deploy/prefect/{name}-work-pool.json"
        assert path.read_text() == make_work_pools.render(gpu), (
            f"{path.name} is stale: run python deploy/prefect/make_work_pools.py"
        )


@pytest.mark.integration
@pytest.mark.parametrize("deployment", ["retrain", "batch_predict"])
def test_work_pools_render_valid_jobs(prefect_harness, deployment):
    """Each pool's template goes through prefect-kubernetes' own worker code, as a worker
    would run the deployment from deploy/prefect/prefect.yaml, and the Job it would submit is
    checked against the Kubernetes 1.32 schemas."""
    import asyncio
    import uuid

    import kubernetes_validate
    from prefect.client.schemas.objects import FlowRun
    from prefect_kubernetes.worker import KubernetesWorker, KubernetesWorkerJobConfiguration

    spec = yaml.safe_load((ROOT / "deploy/prefect/prefect.yaml").read_text())
    dep = next(d for d in spec["deployments"] if d["name"] == deployment)
    pool = dep["work_pool"]["name"]
    template = json.loads((ROOT / f"deploy/prefect/{pool[:3]}-work-pool.json").read_text())
    default = KubernetesWorker.get_default_base_job_template()
    # every knob the stock Kubernetes pool has is still there (the GPU pool sets no CPU limit)
    assert set(default["variables"]["properties"]) - {"cpu_limit"} <= set(
        template["variables"]["properties"]
    )
    values = dict(dep["work_pool"]["job_variables"], image="registry.example/quarkflow:1.0")
    config = asyncio.run(
        KubernetesWorkerJobConfiguration.from_template_and_values(template, values)
    )
    config.prepare_for_flow_run(FlowRun(flow_id=uuid.uuid4(), name="quiet-otter"))
    job = config.job_manifest
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["image"] == "registry.example/quarkflow:1.0"
    assert container["args"][:3] == ["prefect", "flow-run", "execute"]
    assert any(e["name"] == "PREFECT__FLOW_RUN_ID" for e in container["env"])
    assert {"configMapRef": {"name": "quarkflow-config"}} in container["envFrom"]
    assert {"secretRef": {"name": "quarkflow-secrets"}} in container["envFrom"]
    assert pod["serviceAccountName"] == "quarkflow-worker"  # workload identity, no key file
    assert pod["initContainers"][0]["name"] == "cloud-sql-proxy"
    assert job["metadata"]["namespace"] == "quarkflow"
    if pool == "gpu-k8s":
        assert pod["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-l4"}
        assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    else:
        assert "nodeSelector" not in pod
        assert "nvidia.com/gpu" not in str(container["resources"])
    for key in PREFECT_POD_SPEC_QUIRKS:
        pod.pop(key)
    kubernetes_validate.validate(job, "1.32.0", strict=True)

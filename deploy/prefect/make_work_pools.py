"""Writes the base job templates of the two Kubernetes work pools, from prefect-kubernetes'
own default template (so every stock knob stays), with what Quarkflow's flow runs need:

- the settings ConfigMap and the secrets (envFrom; values are never in the template),
- the Cloud SQL Auth Proxy as a native sidecar (workload identity, no key file),
- for ``gpu-k8s``: a GPU node selector, the GPU taint's toleration and a GPU limit.

    python deploy/prefect/make_work_pools.py      # rewrites deploy/prefect/*-work-pool.json

tests/test_deploy_config.py checks that the committed files are what this writes, and renders
them through the worker's own code.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

from prefect_kubernetes.worker import KubernetesWorker

HERE = Path(__file__).resolve().parent
PROXY_IMAGE = "gcr.io/cloud-sql-connectors/cloud-sql-proxy:2.14.1"
PROXY_ARGS = [
    "--structured-logs",
    "--port=5432",
    "--health-check",
    "--http-address=0.0.0.0",
    "$(CLOUDSQL_INSTANCE)",
]
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}


def template(gpu: bool) -> dict:
    t = copy.deepcopy(KubernetesWorker.get_default_base_job_template())
    pod = t["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    container["envFrom"] = [
        {"configMapRef": {"name": "quarkflow-config"}},
        {"secretRef": {"name": "quarkflow-secrets"}},
    ]
    pod["securityContext"] = {"runAsNonRoot": True, "runAsUser": 10001, "fsGroup": 10001}
    pod["initContainers"] = [
        {
            "name": "cloud-sql-proxy",
            "image": PROXY_IMAGE,
            "restartPolicy": "Always",  # a native sidecar: the Job ends when the flow run does
            "args": PROXY_ARGS,
            "env": [
                {
                    "name": "CLOUDSQL_INSTANCE",
                    "valueFrom": {
                        "configMapKeyRef": {"name": "quarkflow-config", "key": "CLOUDSQL_INSTANCE"}
                    },
                }
            ],
            "startupProbe": {
                "httpGet": {"path": "/startup", "port": 9090},
                "periodSeconds": 1,
                "failureThreshold": 60,
            },
            "securityContext": {"runAsNonRoot": True, "allowPrivilegeEscalation": False},
            "resources": {"requests": {"cpu": "50m", "memory": "64Mi"}},
        }
    ]
    p = t["variables"]["properties"]
    p["name"]["default"] = "quarkflow-retrain" if gpu else "quarkflow-flow"
    p["namespace"]["default"] = "quarkflow"
    p["service_account_name"]["default"] = "quarkflow-worker"
    p["service_account_name"]["description"] = (
        "Bound to a GCP service account by workload identity (Cloud SQL + GCS); no key file."
    )
    p["finished_job_ttl"]["default"] = 3600
    if gpu:
        p["image"]["description"] = "The GPU training image: deploy/Dockerfile, target trainer."
        pod["nodeSelector"] = {"cloud.google.com/gke-accelerator": "{{ accelerator }}"}
        pod["tolerations"] = [GPU_TOLERATION]
        container["resources"] = {
            "limits": {"nvidia.com/gpu": "{{ gpu_count }}", "memory": "{{ memory_limit }}"},
            "requests": {"cpu": "{{ cpu_request }}", "memory": "{{ memory_request }}"},
        }
        del p["cpu_limit"]
        p["accelerator"] = {
            "title": "GPU type",
            "type": "string",
            "default": "nvidia-l4",
            "description": "GKE accelerator label of the GPU node pool the job must land on.",
        }
        p["gpu_count"] = {"title": "GPUs", "type": "integer", "default": 1, "minimum": 1}
        # fits a g2-standard-8 (1 L4) next to the proxy and the node's own daemons
        p["cpu_request"]["default"] = "6"
        p["memory_request"]["default"] = p["memory_limit"]["default"] = "24Gi"
    else:
        p["image"]["description"] = "The CPU image: deploy/Dockerfile, target worker."
        p["cpu_request"]["default"] = "1"
        p["memory_request"]["default"] = p["memory_limit"]["default"] = "4Gi"
    return t


def render(gpu: bool) -> str:
    return json.dumps(template(gpu), indent=2) + "\n"


def main() -> None:
    for gpu, name in ((True, "gpu"), (False, "cpu")):
        (HERE / f"{name}-work-pool.json").write_text(render(gpu))


if __name__ == "__main__":
    main()

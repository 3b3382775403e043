"""Deployment files, checked without a Docker engine or a cluster: the compose file's wiring,
the Kubernetes manifests' essentials, and that every command an image or manifest runs is a
real `quarkflow` command."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from quarkflow_core.cli import app as cli_app

pytestmark = pytest.mark.unit
DEPLOY = Path(__file__).resolve().parents[1] / "deploy"


def _cli_commands() -> set[str]:
    names = {c.name or c.callback.__name__ for c in cli_app.registered_commands}
    for group in cli_app.registered_groups:
        names |= {
            f"{group.name} {c.name or c.callback.__name__}"
            for c in group.typer_instance.registered_commands
        }
    return names


def _check_command(cmd: list[str], known: set[str]) -> None:
    if cmd[0] != "quarkflow":
        return
    one, two = cmd[1], " ".join(cmd[1:3])
    assert one in known or two in known, f"`{' '.join(cmd)}` is not a quarkflow command"


def test_compose_wiring():
    spec = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = spec["services"]
    assert {
        "postgres",
        "fake-gcs",
        "migrate",
        "api",
        "workbench",
        "prefect",
        "worker",
        "labelstudio",
    } <= set(services)
    assert services["fake-gcs"]["profiles"] == ["dev"]
    assert services["migrate"]["command"] == ["quarkflow", "db", "upgrade"]
    for name in ("api", "workbench", "worker"):  # migrations run once, before the apps
        assert (
            services[name]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
        )
    for name, svc in services.items():
        if name != "migrate":
            assert "healthcheck" in svc, f"{name} has no health check"
    assert set(spec["volumes"]) >= {"pgdata", "lsdata", "qfdata"}
    text = (DEPLOY / "compose.yaml").read_text()
    assert "${QF_SECRET_KEY:?" in text and "${POSTGRES_PASSWORD:?" in text  # no secret inline
    init = (DEPLOY / "postgres-init.sql").read_text()
    assert "CREATE DATABASE labelstudio" in init and "CREATE DATABASE prefect" in init


def test_kubernetes_manifests_essentials():
    docs = [
        d
        for f in sorted((DEPLOY / "k8s").glob("*.yaml"))
        for d in yaml.safe_load_all(f.read_text())
        if d
    ]
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    for doc in docs:
        assert doc["apiVersion"] and doc["kind"] and doc["metadata"]["name"]
        assert doc["kind"] != "Secret", "secrets are created out of band, never committed"
    assert ("HorizontalPodAutoscaler", "quarkflow-api") in kinds
    assert ("PodDisruptionBudget", "quarkflow-api") in kinds
    api = next(
        d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "quarkflow-api"
    )
    pod = api["spec"]["template"]["spec"]
    assert pod["containers"][0]["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert pod["securityContext"]["runAsNonRoot"] is True
    sa = next(d for d in docs if d["kind"] == "ServiceAccount")
    assert "iam.gke.io/gcp-service-account" in sa["metadata"]["annotations"]  # workload identity
    for doc in docs:
        if doc["kind"] in ("Deployment", "Job"):
            for c in doc["spec"]["template"]["spec"]["containers"]:
                for env in c.get("env", []):
                    assert "value" not in env or "SECRET" not in env["name"], env


def test_every_entrypoint_is_a_real_command():
    known = _cli_commands()
    assert {"serve", "workbench", "worker", "db upgrade"} <= known
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    for line in re.findall(r"^CMD (\[.*\])$", dockerfile, flags=re.M):
        _check_command(yaml.safe_load(line), known)
    assert "USER quarkflow" in dockerfile
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    for svc in compose["services"].values():
        if isinstance(svc.get("command"), list):
            _check_command(svc["command"], known)
    for f in (DEPLOY / "k8s").glob("*.yaml"):
        for doc in yaml.safe_load_all(f.read_text()):
            if doc and doc["kind"] in ("Deployment", "Job"):
                for c in doc["spec"]["template"]["spec"]["containers"]:
                    _check_command(c["command"], known)


@pytest.mark.parametrize("path", sorted((DEPLOY / "k8s").glob("*.yaml")), ids=lambda p: p.name)
def test_kubernetes_manifests_validate_against_the_schemas(path):
    """Strict validation against the Kubernetes 1.32 OpenAPI schemas shipped with
    kubernetes-validate (offline): unknown or misspelt fields fail."""
    import kubernetes_validate

    for doc in yaml.safe_load_all(path.read_text()):
        if doc:
            kubernetes_validate.validate(doc, "1.32.0", strict=True)


def test_the_validator_catches_a_bad_manifest():
    import kubernetes_validate

    bad = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "x"},
        "spec": {"replicas": "two", "selector": {}, "template": {"spec": {"containers": []}}},
    }
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, "1.32.0", strict=True)

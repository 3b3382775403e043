"""Deployment files, checked without a Docker engine or a cluster.

- compose: the official Compose Specification schema (the one `docker compose` validates
  against, vendored by check-jsonschema) plus the cross-references `docker compose config`
  resolves (services, volumes, build targets, required variables); `docker compose config`
  itself where the compose v2 plugin is installed;
- the Dockerfile: hadolint, non-root, and every target's command;
- Kubernetes: strict validation of every manifest against the 1.32 schemas, the settings in the
  ConfigMap are real Quarkflow settings, every reference resolves;
- every command an image, a compose service or a manifest runs exists.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from quarkflow_core.cli import app as cli_app

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
COMPOSE_FILES = [DEPLOY / "compose.yaml", DEPLOY / "compose.gpu.yaml"]
COMPOSE_ENV = {
    "POSTGRES_PASSWORD": "pw-for-tests",
    "QF_SECRET_KEY": "key-for-tests",
    "QF_LABELSTUDIO_TOKEN": "token-for-tests",
    "LABELSTUDIO_ADMIN_EMAIL": "admin@example.com",
    "LABELSTUDIO_ADMIN_PASSWORD": "admin-pw-for-tests",
}
MANIFESTS = sorted((DEPLOY / "k8s").glob("*.yaml"))
BIN = Path(sys.executable).parent


# ----------------------------------------------------------------------------- helpers


def _cli_commands() -> set[str]:
    names = {c.name or c.callback.__name__ for c in cli_app.registered_commands}
    for group in cli_app.registered_groups:
        names |= {
            f"{group.name} {c.name or c.callback.__name__}"
            for c in group.typer_instance.registered_commands
        }
    return names


def _check_command(cmd: list[str], known: set[str]) -> None:
    if cmd[0] == "quarkflow":
        one, two = cmd[1], " ".join(cmd[1:3])
        assert one in known or two in known, f"`{' '.join(cmd)}` is not a quarkflow command"
    elif cmd[:3] == ["prefect", "worker", "start"]:
        from prefect.plugins import load_prefect_collections
        from prefect.workers.base import BaseWorker

        load_prefect_collections()  # registers prefect-kubernetes' worker type
        kind = cmd[cmd.index("--type") + 1]
        assert BaseWorker.get_worker_class_from_type(kind), f"no Prefect worker type {kind!r}"


_VAR = re.compile(r"\$(?:\$|\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\})")


def interpolate(value, env: dict[str, str]):
    """Compose's variable substitution: ${VAR}, ${VAR:-default}, ${VAR-default},
    ${VAR:?error}, ${VAR?error}, $$ (a literal $). A required variable that is missing raises."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name, op, arg = m.group("name", "op", "arg")
        current = env.get(name)
        unset = current is None or (op is not None and op.startswith(":") and current == "")
        if op and op.endswith("?") and unset:
            raise KeyError(f"required variable {name} is missing a value: {arg}")
        if op and op.endswith("-") and unset:
            return arg
        return current or ""

    return _VAR.sub(one, value)


def load_compose(files=COMPOSE_FILES, env=COMPOSE_ENV) -> dict:
    """The files merged as `docker compose -f a -f b` does for the keys we use (mappings merge,
    later files win), then interpolated."""

    def merge(a, b):
        if isinstance(a, dict) and isinstance(b, dict):
            return {k: merge(a[k], b[k]) if k in a and k in b else {**a, **b}[k] for k in a | b}
        return b

    spec: dict = {}
    for f in files:
        spec = merge(spec, yaml.safe_load(f.read_text()))
    return interpolate(spec, env)


def _dockerfile_targets() -> set[str]:
    text = (DEPLOY / "Dockerfile").read_text()
    return set(re.findall(r"^FROM \S+ AS (\S+)$", text, flags=re.M))


def _pod_specs(docs):
    for doc in docs:
        if doc["kind"] in ("Deployment", "Job"):
            yield doc, doc["spec"]["template"]["spec"]


def _k8s_docs() -> list[dict]:
    return [d for f in MANIFESTS for d in yaml.safe_load_all(f.read_text()) if d]


# ----------------------------------------------------------------------------- compose


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_compose_files_match_the_compose_specification(path):
    result = subprocess.run(
        [BIN / "check-jsonschema", "--builtin-schema", "vendor.compose-spec", path],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_compose_schema_check_catches_mistakes(tmp_path):
    bad = tmp_path / "compose.yaml"
    bad.write_text(
        "services:\n  api:\n    image: x\n    depends_on:\n"
        "      db: {condition: service_done}\n    restart: sometimes\n"
    )
    result = subprocess.run(
        [BIN / "check-jsonschema", "--builtin-schema", "vendor.compose-spec", bad],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1
    assert "service_done" in result.stdout


def test_compose_references_resolve():
    spec = load_compose()
    services = spec["services"]
    declared_volumes = set(spec["volumes"])
    targets = _dockerfile_targets()
    for name, svc in services.items():
        for dep in svc.get("depends_on", {}):
            assert dep in services, f"{name} depends on unknown service {dep}"
            # a service that is on by default must not wait for one that is only in a profile
            if "profiles" not in svc:
                assert "profiles" not in services[dep], f"{name} needs {dep}, in a profile"
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith((".", "/")):
                assert (DEPLOY / source).resolve().exists(), f"{name}: no {source}"
            else:
                assert source in declared_volumes, f"{name}: volume {source} not declared"
        if "build" in svc:
            build = svc["build"]
            assert (DEPLOY / build["context"] / build["dockerfile"]).resolve().is_file()
            assert build["target"] in targets, f"{name}: no target {build['target']}"
            assert (DEPLOY / build["context"] / ".dockerignore").is_file()
    ports = [p.split(":")[0] for s in services.values() for p in s.get("ports", [])]
    assert len(ports) == len(set(ports)), f"host port used twice: {ports}"
    assert services["worker"]["build"]["target"] == "trainer"  # with compose.gpu.yaml


def test_compose_refuses_to_start_without_its_secrets():
    for missing in COMPOSE_ENV:
        env = {k: v for k, v in COMPOSE_ENV.items() if k != missing}
        with pytest.raises(KeyError, match=missing):
            load_compose(env=env)
    spec = load_compose(env=COMPOSE_ENV | {"QF_STORAGE_URL": "gs://team-bucket/qf"})
    app_env = spec["services"]["api"]["environment"]
    assert app_env["QF_STORAGE_URL"] == "gs://team-bucket/qf"
    assert app_env["QF_SECRET_KEY"] == "key-for-tests"
    assert "pw-for-tests@postgres:5432/quarkflow" in app_env["QF_DATABASE_URL"]
    # Label Studio's API token is created with the one Quarkflow is given
    ls_env = spec["services"]["labelstudio"]["environment"]
    assert ls_env["LABEL_STUDIO_USER_TOKEN"] == app_env["QF_LABELSTUDIO_TOKEN"]


def test_compose_wiring():
    spec = load_compose([DEPLOY / "compose.yaml"])
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
    assert services["migrate"]["restart"] == "no"
    for name in ("api", "workbench", "worker"):  # migrations run once, before the apps
        assert (
            services[name]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
        )
        assert services[name]["build"]["target"] == ("worker" if name == "worker" else name)
    for name, svc in services.items():
        if name != "migrate":
            assert "healthcheck" in svc, f"{name} has no health check"
    assert set(spec["volumes"]) >= {"pgdata", "lsdata", "qfdata"}
    init = (DEPLOY / "postgres-init.sql").read_text()
    assert "CREATE DATABASE labelstudio" in init and "CREATE DATABASE prefect" in init
    assert services["labelstudio"]["environment"]["POSTGRE_NAME"] == "labelstudio"
    # every QF_* variable the apps get is a real setting
    from quarkflow_core.config import Settings

    fields = {f"QF_{n.upper()}" for n in Settings.model_fields}
    for key in services["api"]["environment"]:
        assert not key.startswith("QF_") or key in fields, f"{key} is not a Quarkflow setting"


def test_docker_compose_config_parses():
    """`docker compose config` itself, where the compose v2 plugin is installed (the Docker
    CLI on the machines this project is tested on has no compose plugin, and the only compose
    packaged for them is v1, which predates the Compose Specification)."""
    if (
        shutil.which("docker") is None
        or subprocess.run(["docker", "compose", "version"], capture_output=True).returncode
    ):
        pytest.skip("the docker compose v2 plugin is not installed")
    args = ["docker", "compose"] + [a for f in COMPOSE_FILES for a in ("-f", str(f))]
    result = subprocess.run(
        [*args, "--profile", "dev", "config", "--quiet"],
        capture_output=True,
        text=True,
        env=os.environ | COMPOSE_ENV,
    )
    assert result.returncode == 0, result.stderr


# ----------------------------------------------------------------------------- Dockerfile


def test_dockerfile_passes_hadolint():
    result = subprocess.run(
        [BIN / "hadolint", "--no-color", DEPLOY / "Dockerfile"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_catches_a_careless_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install torch\nCMD quarkflow serve\n")
    result = subprocess.run([BIN / "hadolint", "--no-color", bad], capture_output=True, text=True)
    assert result.returncode == 1
    assert "DL3007" in result.stdout  # :latest
    assert "DL3013" in result.stdout  # unpinned pip install


def test_images_are_small_non_root_and_pinned():
    text = (DEPLOY / "Dockerfile").read_text()
    assert _dockerfile_targets() >= {"api", "workbench", "worker", "trainer"}
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.11\.\d+-slim-bookworm$", text, flags=re.M)
    # every runnable image drops root, numerically (so Kubernetes can verify runAsNonRoot)
    assert text.count("USER 10001:10001") == 2  # app-cpu (api, workbench, worker) and trainer
    assert "ENV" in text and "SECRET" not in text.replace("no secret", "")
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", ".quarkflow", ".env"} <= set(ignored)


def test_cpu_images_keep_every_pin_but_the_cuda_build():
    """deps-cpu installs requirements.txt minus exactly the CUDA build of torch and its CUDA
    libraries, and the CPU build of the same torch/torchvision versions."""
    text = (DEPLOY / "Dockerfile").read_text()
    pattern = re.search(r"grep -vE '([^']+)'", text).group(1)
    pins = [ln for ln in (ROOT / "requirements.txt").read_text().splitlines() if "==" in ln]
    dropped = {p.split("==")[0] for p in pins if re.search(pattern, p)}
    assert {"torch", "torchvision", "triton"} <= dropped
    assert all(
        d in ("torch", "torchvision", "triton") or d.startswith(("nvidia-", "cuda-"))
        for d in dropped
    ), dropped
    assert {"torch-pruning", "torchmetrics", "onnxruntime"}.isdisjoint(dropped)
    assert "\"$(grep '^torch==' /tmp/requirements.txt)+cpu\"" in text


# ----------------------------------------------------------------------------- Kubernetes


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
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


def test_kubernetes_manifests_essentials():
    docs = _k8s_docs()
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    for doc in docs:
        assert doc["kind"] != "Secret", "secrets are created out of band, never committed"
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == "quarkflow"
    assert {
        ("HorizontalPodAutoscaler", "quarkflow-api"),
        ("PodDisruptionBudget", "quarkflow-api"),
        ("Deployment", "quarkflow-workbench"),
        ("Deployment", "quarkflow-worker"),
        ("Deployment", "quarkflow-gpu-worker"),
        ("Deployment", "prefect-server"),
        ("Job", "quarkflow-migrate"),
        ("RoleBinding", "prefect-worker"),
    } <= kinds
    api = next(
        d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "quarkflow-api"
    )
    pod = api["spec"]["template"]["spec"]
    assert pod["containers"][0]["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert api["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    sa = next(d for d in docs if d["kind"] == "ServiceAccount")
    assert "iam.gke.io/gcp-service-account" in sa["metadata"]["annotations"]  # workload identity
    configmaps = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ConfigMap"}
    accounts = {d["metadata"]["name"] for d in docs if d["kind"] == "ServiceAccount"}
    secrets = {"quarkflow-secrets", "quarkflow-service-secrets"}  # documented in config.yaml
    for doc, pod in _pod_specs(docs):
        name = doc["metadata"]["name"]
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["serviceAccountName"] in accounts, name
        for c in pod["containers"] + pod.get("initContainers", []):
            assert c["resources"]["requests"], f"{name}/{c['name']} has no resource requests"
            for env in c.get("env", []):  # secrets only by reference
                literal = env.get("value", "") not in ("", "true", "false")
                assert not (literal and re.search("SECRET|PASSWORD|TOKEN", env["name"])), env
            for source in c.get("envFrom", []):
                if "configMapRef" in source:
                    assert source["configMapRef"]["name"] in configmaps
                else:
                    assert source["secretRef"]["name"] in secrets
        if any(ref in str(pod["containers"]) for ref in secrets):
            # whatever holds database credentials reaches Cloud SQL through the proxy sidecar,
            # authenticated by workload identity
            sidecar = pod["initContainers"][0]
            assert sidecar["name"] == "cloud-sql-proxy", name
            assert sidecar["restartPolicy"] == "Always", name  # a native sidecar


def test_the_configmap_holds_valid_quarkflow_settings():
    from quarkflow_core.config import Settings

    config = next(d for d in _k8s_docs() if d["kind"] == "ConfigMap")["data"]
    fields = {f"QF_{n.upper()}" for n in Settings.model_fields}
    qf = {k: v for k, v in config.items() if k.startswith("QF_")}
    assert set(qf) <= fields, set(qf) - fields
    secrets = {
        "QF_DATABASE_URL": "postgresql://quarkflow:pw@127.0.0.1:5432/quarkflow",
        "QF_SECRET_KEY": "k" * 64,
    }
    settings = Settings(**{k[3:].lower(): v for k, v in (qf | secrets).items()})
    assert settings.storage_url.startswith("gs://")
    assert settings.anonymous_demo is False
    assert settings.database_url.startswith("postgresql+psycopg2://")


# ----------------------------------------------------------------------------- commands


def test_every_entrypoint_is_a_real_command():
    known = _cli_commands()
    assert {"serve", "workbench", "worker", "db upgrade", "doctor"} <= known
    for line in re.findall(r"^\s*CMD (\[.*\])$", (DEPLOY / "Dockerfile").read_text(), flags=re.M):
        cmd = yaml.safe_load(line)
        if cmd[0] != "python":
            _check_command(cmd, known)
    for svc in load_compose()["services"].values():
        if isinstance(svc.get("command"), list):
            _check_command(svc["command"], known)
    for _, pod in _pod_specs(_k8s_docs()):
        for c in pod["containers"]:
            if "command" in c:
                _check_command(c["command"], known)


@pytest.mark.parametrize("doc", ["README.md", "docs/operations.md"])
def test_documented_commands_exist(doc):
    """Every `quarkflow ...` command in a code span or block of the docs is a real one."""
    known = _cli_commands()
    text = (ROOT / doc).read_text()
    code = re.findall(r"```.*?```", text, flags=re.S) + re.findall(r"`([^`\n]+)`", text)
    found = [
        m.group(1).split()
        for block in code
        for m in re.finditer(
            r"(?<!-n )(?:^|(?<=[\s(/]))quarkflow ([a-z][a-z-]*(?: [a-z][a-z-]*)?)", block
        )
    ]
    assert found
    for words in found:
        _check_command(["quarkflow", *words], known)

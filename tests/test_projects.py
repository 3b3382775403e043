"""Two projects on one installation, end to end through the doors people use: an admin creates
a project with the REST API, an ML lead registers a model in it with the CLI's ``--project`` and
approves it with the project's API path, experts predict and give verdicts in both. Neither
project ever sees the other's data, models, review queue or champion; the default paths are
the default project's. (Each layer's own isolation tests: test_projects_registry,
test_projects_serving, test_projects_queue, test_projects_api, test_analytics.)"""

from __future__ import annotations

import subprocess
import sys

import httpx
import pytest
from helpers.serving import ThreadedServer, local_deploy, wait_until
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.api import create_app
from quarkflow_core.demo_data import demo_pngs
from quarkflow_core.schema import Image, Prediction, ReviewItem

pytestmark = pytest.mark.slow
DIGITS = [str(i) for i in range(10)]


def _cli(dep, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *args],
        env=dep.env(),
        capture_output=True,
        text=True,
        timeout=300,
    )


def _predict(url: str, dep, path: str, images: list[bytes]) -> list[dict]:
    out = []
    for data in images:
        r = httpx.post(
            url + path,
            files={"file": ("d.png", data, "image/png")},
            headers=dep.auth("expert"),
            timeout=60,
        )
        assert r.status_code == 200, r.text
        out.append(r.json())
    return out


def test_two_projects_never_see_each_other(tmp_path, trained_artifacts):
    dep = local_deploy(tmp_path, trained_artifacts["weak"])  # default project: v1 champion
    api = create_app(dep.settings(model_poll_s=0.2), with_demo=False)
    engine = dep.engine()
    with ThreadedServer(api) as live:
        url = live.url
        # an admin creates the project; nobody else may
        body = {"name": "lab", "classes": DIGITS, "title": "Lab digits"}
        refused = httpx.post(url + "/api/v1/projects", json=body, headers=dep.auth("lead"))
        assert refused.status_code == 403, refused.text
        made = httpx.post(url + "/api/v1/projects", json=body, headers=dep.auth("admin"))
        assert made.status_code == 201, made.text
        listed = httpx.get(url + "/api/v1/projects", headers=dep.auth("expert")).json()
        assert [p["name"] for p in listed["projects"]] == ["default", "lab"]

        # a fresh project has no model: nothing is served there yet
        pngs, _ = demo_pngs(12)
        r = httpx.post(
            url + "/api/v1/projects/lab/predictions",
            files={"file": ("d.png", pngs[0], "image/png")},
            headers=dep.auth("expert"),
        )
        assert r.status_code == 503, r.text

        # the ML lead registers the strong model in "lab" (CLI) and approves it (API)
        strong = str(trained_artifacts["strong"])
        reg = _cli(dep, "--project", "lab", "models", "register", strong, "--user", "lead")
        assert reg.returncode == 0, reg.stdout + reg.stderr
        assert "registered v1" in reg.stdout  # each project counts its versions from v1
        ok = httpx.post(
            url + "/api/v1/projects/lab/models/1/approve",
            json={"reason": "first champion of the lab project", "override": True},
            headers=dep.auth("lead"),
        )
        assert ok.status_code == 200, ok.text
        wait_until(
            lambda: (
                httpx.post(
                    url + "/api/v1/projects/lab/predictions",
                    files={"file": ("d.png", pngs[0], "image/png")},
                    headers=dep.auth("expert"),
                ).status_code
                == 200
            ),
            timeout=60,
            what="the lab champion to be served",
        )

        # the two champions are different models, each served on its own paths
        def versions(prefix: str) -> list[dict]:
            r = httpx.get(url + prefix + "/models", headers=dep.auth("expert"))
            assert r.status_code == 200, r.text
            return r.json()["versions"]

        default_models, lab_models = versions("/api/v1"), versions("/api/v1/projects/lab")
        assert default_models == versions("/api/v1/projects/default")
        assert [m["version"] for m in lab_models] == [1]
        sha = {m["sha256"] for m in default_models} | {m["sha256"] for m in lab_models}
        assert len(sha) == 2

        in_default = _predict(url, dep, "/api/v1/predictions", pngs[1:6])
        in_lab = _predict(url, dep, "/api/v1/projects/lab/predictions", pngs[6:12])

        # a prediction is found only through its own project
        pid = in_lab[0]["id"]
        wait_until(
            lambda: (
                httpx.get(
                    f"{url}/api/v1/projects/lab/predictions/{pid}", headers=dep.auth("expert")
                )
                .json()
                .get("logged")
            ),
            what="the outbox to log the lab prediction",
        )
        assert (
            httpx.get(f"{url}/api/v1/predictions/{pid}", headers=dep.auth("expert")).status_code
            == 404
        )
        fb = httpx.post(
            f"{url}/api/v1/predictions/{pid}/feedback",
            json={"verdict": "correct"},
            headers=dep.auth("expert"),
        )
        assert fb.status_code == 404, fb.text
        fb = httpx.post(
            f"{url}/api/v1/projects/lab/predictions/{pid}/feedback",
            json={"verdict": "wrong", "true_label": "3"},
            headers=dep.auth("expert"),
        )
        assert fb.status_code == 201, fb.text

        # unknown projects are named in a 404
        gone = httpx.get(url + "/api/v1/projects/nope/models", headers=dep.auth("expert"))
        assert gone.status_code == 404 and "nope" in gone.text

        wait_until(
            lambda: httpx.get(url + "/readyz").json()["checks"]["outbox"]["depth"] == 0,
            what="the outbox to drain",
        )
        # the review queues: each project's items only
        queues = {}
        for name, prefix in (("default", "/api/v1"), ("lab", "/api/v1/projects/lab")):
            r = httpx.get(url + prefix + "/review-queue?limit=100", headers=dep.auth("analyst"))
            assert r.status_code == 200, r.text
            queues[name] = r.json()
        lab_ids = {p["id"] for p in in_lab}
        default_ids = {p["id"] for p in in_default}

        def prediction_ids(queue) -> set[str]:
            items = queue["items"] if isinstance(queue, dict) else queue
            return {i.get("prediction_id") for i in items}

        assert not prediction_ids(queues["default"]) & lab_ids
        assert not prediction_ids(queues["lab"]) & default_ids

    # the rows: every image and prediction in its own project
    with Session(engine) as s:
        lab = s.scalar(select(Prediction.project_id).where(Prediction.id == pid))
        assert lab == 2
        per_project = dict(
            s.execute(
                select(Prediction.project_id, func.count()).group_by(Prediction.project_id)
            ).all()
        )
        assert per_project == {1: 5, 2: 7}  # 6 + the one that waited for the champion
        assert {
            s.scalar(select(Image.project_id).where(Image.id == p.image_id))
            for p in s.scalars(select(Prediction).where(Prediction.project_id == 2))
        } == {2}
        for item in s.scalars(select(ReviewItem)):
            image = s.get(Image, item.image_id)
            assert image.project_id == item.project_id
    engine.dispose()

"""Projects at the edges: the REST API's project administration and project-scoped paths, and
the CLI's `quarkflow projects ...` and `quarkflow --project NAME`.

- an admin creates a project (POST /api/v1/projects); anyone else is refused 403, audited;
- an unknown project is a 404 that names it (and the projects there are);
- /api/v1/projects/{p}/models lists that project's versions only; the default paths answer
  exactly what /api/v1/projects/default/... answers;
- a grant makes an analyst the ML lead of one project, and of that one only;
- predictions through a project's path are served by its champion and logged in it;
- the OpenAPI schema keeps the default paths and adds the project ones, with unique ids.
"""

from __future__ import annotations

import json

import httpx
import pytest
from fastapi.testclient import TestClient
from helpers.serving import ThreadedServer, deploy, local_deploy, run_cli, wait_until
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.api import create_app
from quarkflow_core import registry
from quarkflow_core.demo_data import demo_pngs
from quarkflow_core.errors import InvalidInput, NotFound
from quarkflow_core.projects import create_project
from quarkflow_core.schema import AuditLog, Prediction, ProjectGrant, User

pytestmark = pytest.mark.integration
DIGITS = [str(i) for i in range(10)]
LAB = "/api/v1/projects/lab"

# the API's paths from before projects: they stay exactly as they were
DEFAULT_PATHS = {
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/metrics"),
    ("POST", "/api/v1/predictions"),
    ("POST", "/api/v1/predictions/batch"),
    ("GET", "/api/v1/predictions/{prediction_id}"),
    ("POST", "/api/v1/predictions/{prediction_id}/feedback"),
    ("GET", "/api/v1/review-queue"),
    ("POST", "/api/v1/review-queue/{item_id}/resolve"),
    ("POST", "/api/v1/review-queue/{item_id}/dismiss"),
    ("GET", "/api/v1/images/{sha256}/prediction"),
    ("GET", "/api/v1/images/{sha256}"),
    ("POST", "/api/v1/labelstudio/webhook"),
    ("GET", "/api/v1/models"),
    ("GET", "/api/v1/models/aliases"),
    ("GET", "/api/v1/models/history"),
    ("GET", "/api/v1/models/{ref}"),
    ("GET", "/api/v1/models/{ref}/proposal"),
    ("POST", "/api/v1/models/{ref}/approve"),
    ("POST", "/api/v1/models/{ref}/reject"),
    ("POST", "/api/v1/models/rollback"),
    ("POST", "/api/v1/retrain"),
    ("POST", "/api/v1/users"),
    ("GET", "/api/v1/whoami"),
}
NOT_PROJECT_SCOPED = {"/healthz", "/readyz", "/metrics", "/api/v1/users", "/api/v1/whoami"}
ADMIN_PATHS = {
    ("GET", "/api/v1/projects"),
    ("POST", "/api/v1/projects"),
    ("GET", "/api/v1/projects/{project}"),
    ("PUT", "/api/v1/projects/{project}/grants/{username}"),
    ("DELETE", "/api/v1/projects/{project}/grants/{username}"),
}
# the Open Inference Protocol's REST paths (app/api/v2.py): a model there is a project
OIP_PATHS = {
    ("GET", "/v2"),
    ("GET", "/v2/health/live"),
    ("GET", "/v2/health/ready"),
    ("GET", "/v2/models/{model_name}"),
    ("GET", "/v2/models/{model_name}/versions/{model_version}"),
    ("GET", "/v2/models/{model_name}/ready"),
    ("GET", "/v2/models/{model_name}/versions/{model_version}/ready"),
    ("POST", "/v2/models/{model_name}/infer"),
    ("POST", "/v2/models/{model_name}/versions/{model_version}/infer"),
}


@pytest.fixture
def dep(tmp_path, trained_artifacts):
    """Default project: champion v1 (strong) and candidate v2 (strong_b). Project "lab"
    (id 2, digits): candidates v1 (weak) and v2 (strong_b), no champion."""
    d = local_deploy(tmp_path, trained_artifacts["strong"])
    storage, engine = d.storage(), d.engine()
    try:
        with Session(engine, expire_on_commit=False) as s:
            registry.register_version(
                session=s,
                storage=storage,
                artifact_dir=trained_artifacts["strong_b"],
                created_by="t",
            )
            lab = create_project(session=s, name="lab", classes=DIGITS, title="Lab digits")
            for name in ("weak", "strong_b"):
                registry.register_version(
                    session=s,
                    storage=storage,
                    artifact_dir=trained_artifacts[name],
                    created_by="t",
                    project_id=lab.id,
                )
            s.commit()
            assert lab.id == 2
    finally:
        engine.dispose()
    return d


def _audit(dep, action: str, outcome: str) -> list[AuditLog]:
    engine = dep.engine()
    try:
        with Session(engine) as s:
            return list(
                s.scalars(
                    select(AuditLog)
                    .where(AuditLog.action == action, AuditLog.outcome == outcome)
                    .order_by(AuditLog.id)
                )
            )
    finally:
        engine.dispose()


def _client(dep) -> TestClient:
    return TestClient(create_app(dep.settings(), with_demo=False, watch=False))


# --------------------------------------------------------------------------- administration


def test_an_admin_creates_a_project_and_nobody_else_may(fresh_db_url, tmp_path):
    dep = deploy(fresh_db_url, f"file://{tmp_path}/store", tmp_path / "qf", None)
    body = {"name": "birds", "classes": ["robin", "wren"], "title": "Garden birds"}
    with _client(dep) as client:
        for who in ("expert", "analyst", "lead"):
            refused = client.post("/api/v1/projects", json=body, headers=dep.auth(who))
            assert refused.status_code == 403, refused.text
            assert refused.json()["error"] == "permission_denied"
        assert client.post("/api/v1/projects", json=body).status_code == 401

        made = client.post("/api/v1/projects", json=body, headers=dep.auth("admin"))
        assert made.status_code == 201, made.text
        project = made.json()
        assert (project["name"], project["title"], project["task_type"]) == (
            "birds",
            "Garden birds",
            "classification",
        )
        assert project["classes"] == ["robin", "wren"] and project["created_by"] == "admin"

        again = client.post("/api/v1/projects", json=body, headers=dep.auth("admin"))
        assert again.status_code == 409, again.text
        fresh = {**body, "name": "fish"}
        for bad in (
            {**fresh, "name": "Fish!"},
            {**fresh, "classes": ["cod"]},
            {**fresh, "classes": ["cod", "cod"]},
            {**fresh, "task_type": "segmentation"},
        ):
            r = client.post("/api/v1/projects", json=bad, headers=dep.auth("admin"))
            assert r.status_code == 422, (bad, r.text)

        listed = client.get("/api/v1/projects", headers=dep.auth("expert"))
        assert listed.status_code == 200, listed.text
        assert [p["name"] for p in listed.json()["projects"]] == ["default", "birds"]
        one = client.get("/api/v1/projects/birds", headers=dep.auth("expert")).json()
        assert one["id"] == project["id"] and one["grants"] == []
        by_id = client.get(f"/api/v1/projects/{project['id']}", headers=dep.auth("expert"))
        assert by_id.json()["name"] == "birds"
        assert client.get("/api/v1/projects").status_code == 401

    denied = _audit(dep, "projects.create", "denied")
    assert [(d.actor, d.detail["role"]) for d in denied] == [
        ("expert", "domain_expert"),
        ("analyst", "analyst"),
        ("lead", "ml_lead"),
    ]
    (ok,) = _audit(dep, "projects.create", "ok")
    assert (ok.actor, ok.target_type, ok.target_id) == ("admin", "project", "birds")


def test_an_unknown_project_is_a_404_that_names_it(dep):
    with _client(dep) as client:
        for method, path in (
            ("GET", "/api/v1/projects/nope"),
            ("GET", "/api/v1/projects/nope/models"),
            ("GET", "/api/v1/projects/nope/review-queue"),
            ("POST", "/api/v1/projects/nope/models/1/reject"),
            ("PUT", "/api/v1/projects/nope/grants/analyst"),
            ("GET", "/api/v1/projects/99/models"),
        ):
            r = client.request(
                method,
                path,
                json={"reason": "x", "role": "analyst"},
                headers=dep.auth("admin"),
            )
            assert r.status_code == 404, (path, r.text)
            assert r.json()["error"] == "not_found"
            assert "nope" in r.json()["detail"] or "99" in r.json()["detail"]
            assert "default, lab" in r.json()["detail"]  # and names the projects there are
        r = client.post(
            "/api/v1/projects/nope/predictions",
            files={"file": ("d.png", demo_pngs(1)[0][0], "image/png")},
            headers=dep.auth("expert"),
        )
        assert r.status_code == 404 and "nope" in r.json()["detail"]


# --------------------------------------------------------------------------- project paths


def test_a_project_path_sees_its_project_only(dep, trained_artifacts):
    expert = dep.auth("expert")
    with _client(dep) as client:
        lab = client.get(f"{LAB}/models", headers=expert)
        assert lab.status_code == 200, lab.text
        versions = lab.json()["versions"]
        assert [v["version"] for v in versions] == [1, 2]
        assert all(v["aliases"] == [] for v in versions)  # no champion in lab yet
        default = client.get("/api/v1/models", headers=expert).json()["versions"]
        assert [(v["version"], v["aliases"]) for v in default] == [(1, ["champion"]), (2, [])]
        # the same artifact in two projects is two versions; weak is lab's v1 only
        assert versions[0]["sha256"] not in {v["sha256"] for v in default}
        # by id, too
        assert client.get("/api/v1/projects/2/models", headers=expert).json() == lab.json()

        assert client.get(f"{LAB}/models/aliases", headers=expert).json()["aliases"] == {}
        assert client.get(f"{LAB}/models/champion", headers=expert).status_code == 404
        assert client.get(f"{LAB}/models/3", headers=expert).status_code == 404
        assert client.get(f"{LAB}/models/history", headers=expert).json() == {"events": []}
        lab_v1 = client.get(f"{LAB}/models/1", headers=expert).json()
        assert lab_v1["sha256"] == versions[0]["sha256"]


@pytest.mark.parametrize(
    "path",
    [
        "/models",
        "/models/aliases",
        "/models/history",
        "/models/1",
        "/models/champion",
        "/models/v2",
        "/review-queue",
        "/predictions/no-such-id",
        "/images/" + "0" * 64 + "/prediction",
    ],
)
def test_the_default_paths_are_the_default_project(dep, path):
    with _client(dep) as client:
        plain = client.get("/api/v1" + path, headers=dep.auth("analyst"))
        named = client.get("/api/v1/projects/default" + path, headers=dep.auth("analyst"))
        by_id = client.get("/api/v1/projects/1" + path, headers=dep.auth("analyst"))
    assert plain.status_code == named.status_code == by_id.status_code
    assert plain.json() == named.json() == by_id.json()


def test_a_grant_makes_an_analyst_ml_lead_in_one_project_only(dep):
    analyst, admin = dep.auth("analyst"), dep.auth("admin")
    reason = {"reason": "not good enough"}
    with _client(dep) as client:
        # only an admin grants
        r = client.put(f"{LAB}/grants/analyst", json={"role": "ml_lead"}, headers=dep.auth("lead"))
        assert r.status_code == 403, r.text
        assert (
            client.post(f"{LAB}/models/1/reject", json=reason, headers=analyst).status_code == 403
        )

        r = client.put(f"{LAB}/grants/analyst", json={"role": "ml_lead"}, headers=admin)
        assert r.status_code == 200, r.text
        assert r.json() == {"project": "lab", "username": "analyst", "role": "ml_lead"}
        grants = client.get(LAB, headers=analyst).json()["grants"]
        assert [(g["username"], g["role"], g["granted_by"]) for g in grants] == [
            ("analyst", "ml_lead", "admin")
        ]

        # the ML lead of lab...
        ok = client.post(f"{LAB}/models/1/reject", json=reason, headers=analyst)
        assert ok.status_code == 200, ok.text
        assert ok.json()["action"] == "reject"
        # (starting lab's retrain gets past the role check: no Prefect server here)
        retrain = client.post(f"{LAB}/retrain", json={"epochs": 1}, headers=analyst)
        assert (retrain.status_code, retrain.json()["error"]) == (503, "config_error")
        # ...and an analyst everywhere else
        retrain = client.post("/api/v1/retrain", json={"epochs": 1}, headers=analyst)
        assert retrain.status_code == 403, retrain.text
        other = client.post("/api/v1/models/2/reject", json=reason, headers=analyst)
        assert other.status_code == 403, other.text
        named = client.post(
            "/api/v1/projects/default/models/2/reject", json=reason, headers=analyst
        )
        assert named.status_code == 403, named.text

        r = client.request("DELETE", f"{LAB}/grants/analyst", headers=admin)
        assert r.status_code == 200, r.text
        assert r.json() == {
            "project": "lab",
            "username": "analyst",
            "revoked": True,
            "own_role": "analyst",
        }
        assert client.get(LAB, headers=analyst).json()["grants"] == []
        again = client.post(f"{LAB}/models/2/reject", json=reason, headers=analyst)
        assert again.status_code == 403, again.text
        assert (
            client.put(f"{LAB}/grants/nobody", json={"role": "analyst"}, headers=admin).status_code
            == 404
        )
        assert (
            client.put(f"{LAB}/grants/analyst", json={"role": "boss"}, headers=admin).status_code
            == 422
        )

    (granted,) = _audit(dep, "projects.grant", "ok")
    assert (granted.actor, granted.target_id) == ("admin", "analyst")
    assert granted.detail == {"project": "lab", "project_id": 2, "role": "ml_lead"}
    (revoked,) = _audit(dep, "projects.revoke", "ok")
    assert revoked.detail == {"project": "lab", "project_id": 2, "revoked": True}
    (refused_grant,) = _audit(dep, "projects.grant", "denied")
    assert refused_grant.actor == "lead" and refused_grant.detail["project_id"] == 2
    refusals = _audit(dep, "models.reject", "denied")
    assert [r.detail.get("project_id") for r in refusals] == [2, 1, 1, 2]
    (rejected,) = _audit(dep, "models.reject", "ok")
    assert rejected.actor == "analyst"


def test_the_labelstudio_webhook_in_a_project(dep):
    from quarkflow_core.review import webhook_secret

    secret = {"X-Quarkflow-Webhook-Secret": webhook_secret(dep.settings())}
    event = {"action": "ANNOTATION_CREATED", "annotation": None}
    with _client(dep) as client:
        for path in ("/api/v1/labelstudio/webhook", f"{LAB}/labelstudio/webhook"):
            assert client.post(path, json=event).status_code == 401
            r = client.post(path, json=event, headers=secret)
            assert r.status_code == 200, (path, r.text)
            assert r.json()["action"] == "ANNOTATION_CREATED"
        r = client.post("/api/v1/projects/nope/labelstudio/webhook", json=event, headers=secret)
        assert r.status_code == 404


def test_predictions_through_a_project_path(dep):
    """Over real HTTP: lab has no champion (503), then its own (v1, weak); its predictions are
    logged in lab and found through lab's paths only."""
    pngs, _ = demo_pngs(3)
    app = create_app(dep.settings(model_poll_s=0.2), with_demo=False)
    with ThreadedServer(app) as live:

        def predict(prefix: str, data: bytes = pngs[0]) -> httpx.Response:
            return httpx.post(
                live.url + prefix + "/predictions",
                files={"file": ("d.png", data, "image/png")},
                headers=dep.auth("expert"),
                timeout=60,
            )

        assert predict(LAB).status_code == 503
        approved = httpx.post(
            live.url + f"{LAB}/models/1/approve",
            json={"reason": "first champion of lab", "override": True},
            headers=dep.auth("admin"),
            timeout=120,
        )
        assert approved.status_code == 200, approved.text

        def served() -> dict | None:
            r = predict(LAB)
            return r.json() if r.status_code == 200 else None

        body = wait_until(served, timeout=60, what="lab's champion to be served")
        assert body["model_version"] == 1 and body["label"] in DIGITS
        pid = body["id"]
        wait_until(
            lambda: httpx.get(
                f"{live.url}{LAB}/predictions/{pid}", headers=dep.auth("expert")
            ).json()["logged"],
            what="the lab prediction to be logged",
        )
        # not the default project's
        assert (
            httpx.get(
                f"{live.url}/api/v1/predictions/{pid}", headers=dep.auth("expert")
            ).status_code
            == 404
        )
        fb = httpx.post(
            f"{live.url}{LAB}/predictions/{pid}/feedback",
            json={"verdict": "correct"},
            headers=dep.auth("expert"),
        )
        assert fb.status_code == 201, fb.text
        # the default project still answers with its own champion
        assert predict("/api/v1").status_code == 200
        # the project paths have the upload limits of the default ones
        big = predict(LAB, b"\x89PNG" + b"\0" * 400_000)
        assert big.status_code == 413 and big.json()["error"] == "too_large"
        # and the metrics tell the two mounts apart
        metrics = httpx.get(live.url + "/metrics").text
        for route in ("/api/v1/predictions", "/api/v1/projects/{project}/predictions"):
            assert f'method="POST",route="{route}",status="200"' in metrics, route

    engine = dep.engine()
    try:
        with Session(engine) as s:
            assert s.get(Prediction, pid).project_id == 2
    finally:
        engine.dispose()


def test_openapi_keeps_the_default_paths_and_adds_the_project_ones(tmp_path):
    from quarkflow_core.config import load_settings

    settings = load_settings(
        data_dir=tmp_path,
        database_url=f"sqlite:///{tmp_path}/x.db",
        storage_url=f"file://{tmp_path}/s",
        secret_key="x",
    )
    schema = create_app(settings, with_demo=False).openapi()
    operations = [
        (method.upper(), path, op)
        for path, ops in schema["paths"].items()
        for method, op in ops.items()
    ]
    routes = {(m, p) for m, p, _ in operations}
    scoped = {
        (m, p.replace("/api/v1", "/api/v1/projects/{project}", 1))
        for m, p in DEFAULT_PATHS
        if p not in NOT_PROJECT_SCOPED
    }
    assert routes == DEFAULT_PATHS | ADMIN_PATHS | scoped | OIP_PATHS
    # the default paths come first, in their order from before projects
    assert [(m, p) for m, p, _ in operations][: len(DEFAULT_PATHS)] == [
        (m, p) for m, p, _ in operations if (m, p) in DEFAULT_PATHS
    ]
    ids = [op["operationId"] for _, _, op in operations]
    assert len(ids) == len(set(ids))
    for method, path, op in operations:
        declared = {p["name"] for p in op.get("parameters", []) if p["in"] == "path"}
        templated = {part[1:-1] for part in path.split("/") if part.startswith("{")}
        assert declared == templated, (method, path)
    # a default path's operation id is what it was: derived from its own path
    default_ids = {op["operationId"] for m, p, op in operations if (m, p) in DEFAULT_PATHS}
    assert "list_models_api_v1_models_get" in default_ids
    assert "predict_api_v1_predictions_post" in default_ids


# --------------------------------------------------------------------------- the CLI


def _cli(dep, monkeypatch, *args: str):
    return run_cli(dep, monkeypatch, *args)


def test_cli_projects_create_list_show_grant_revoke(dep, monkeypatch):
    made = _cli(
        dep, monkeypatch, "projects", "create", "birds", "--classes", "robin, wren", "--title", "B"
    )
    assert made.exit_code == 0, made.output
    assert "created project birds (id 3, 2 classes)" in made.output
    one_class = _cli(dep, monkeypatch, "projects", "create", "fish", "--classes", "cod")
    assert isinstance(one_class.exception, InvalidInput)

    listed = _cli(dep, monkeypatch, "projects", "list")
    assert listed.exit_code == 0, listed.output
    assert all(name in listed.output for name in ("default", "lab", "birds", "robin, wren"))
    as_json = json.loads(_cli(dep, monkeypatch, "projects", "list", "--json").output)
    assert [p["name"] for p in as_json["projects"]] == ["default", "lab", "birds"]

    granted = _cli(dep, monkeypatch, "projects", "grant", "birds", "analyst", "--role", "ml_lead")
    assert granted.exit_code == 0, granted.output
    assert "analyst is ml_lead in project birds" in granted.output
    shown = json.loads(
        _cli(dep, monkeypatch, "--project", "birds", "projects", "show", "--json").output
    )
    assert shown["name"] == "birds" and [(g["username"], g["role"]) for g in shown["grants"]] == [
        ("analyst", "ml_lead")
    ]
    users = _cli(dep, monkeypatch, "users", "list")
    assert "birds: ml_lead" in users.output

    revoked = _cli(dep, monkeypatch, "projects", "revoke", "birds", "analyst")
    assert revoked.exit_code == 0, revoked.output
    assert "own role (analyst)" in revoked.output

    missing = _cli(dep, monkeypatch, "projects", "show", "nope")
    assert isinstance(missing.exception, NotFound) and "nope" in missing.exception.detail

    engine = dep.engine()
    try:
        with Session(engine) as s:
            assert s.scalar(select(ProjectGrant)) is None
            analyst = s.scalar(select(User).where(User.username == "analyst"))
            assert analyst.role.value == "analyst"
    finally:
        engine.dispose()
    (created,) = _audit(dep, "projects.create", "ok")
    assert created.actor.startswith("cli:") and created.target_id == "birds"
    assert (
        len(_audit(dep, "projects.grant", "ok")) == len(_audit(dep, "projects.revoke", "ok")) == 1
    )


def test_cli_project_option_picks_the_project(dep, monkeypatch):
    default = _cli(dep, monkeypatch, "models", "list")
    assert default.exit_code == 0, default.output
    assert "champion" in default.output and "v2" in default.output

    lab = _cli(dep, monkeypatch, "--project", "lab", "models", "list")
    assert lab.exit_code == 0, lab.output
    assert "v1" in lab.output and "v2" in lab.output and "champion" not in lab.output
    assert lab.output != default.output

    same = _cli(dep, monkeypatch, "--project", "default", "models", "list")
    assert same.output == default.output

    unknown = _cli(dep, monkeypatch, "--project", "nope", "models", "list")
    assert isinstance(unknown.exception, NotFound), unknown.output
    assert "nope" in unknown.exception.detail and "default, lab" in unknown.exception.detail


def test_cli_project_helper_outside_a_command_is_the_default_project():
    from app.cli.common import project_name

    assert project_name() == "default"

"""One authorization path (``users.authorize``): the same refusal lands in audit_log the same way
whichever entry point it came through (the REST API, the `quarkflow` CLI, the Streamlit
workbench), and the same allowed action lands as "ok" from each; on SQLite and Postgres, with a
real champion and challenger."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from helpers.serving import SECRET, deploy, seed_and_register
from sqlalchemy import select
from sqlalchemy.orm import Session
from streamlit.testing.v1 import AppTest
from typer.testing import CliRunner

from app import cli
from app.api import create_app
from quarkflow_core.config import get_settings
from quarkflow_core.errors import PermissionDenied
from quarkflow_core.schema import AuditLog, PromotionAction, PromotionEvent, Role, User
from quarkflow_core.service import ANONYMOUS, Principal
from quarkflow_core.users import (
    Operator,
    admin_create_user,
    authorize,
    can,
    create_token,
    create_user,
)

pytestmark = pytest.mark.integration
REASON = "not better than the champion where it matters"


@pytest.fixture
def dep(fresh_db_url, tmp_path, trained_artifacts):
    """Champion v1, challenger v2 (with the seed hold-out the workbench compares them on), a
    user and token per role, and "lee", an ML lead with a token of their own."""
    d = deploy(
        fresh_db_url, f"file://{tmp_path}/store", tmp_path / "qf", trained_artifacts["strong"]
    )
    seed_and_register(d, trained_artifacts["strong_b"])
    engine = d.engine()
    try:
        with Session(engine, expire_on_commit=False) as s:
            lee = create_user(session=s, username="lee", role=Role.ML_LEAD)
            _, d.tokens["lee"] = create_token(session=s, user=lee, secret=SECRET)
            s.commit()
    finally:
        engine.dispose()
    return d


def _env(dep, monkeypatch) -> None:
    for key, value in dep.env().items():
        if key.startswith("QF_"):
            monkeypatch.setenv(key, value)
    get_settings.cache_clear()


def _cli(dep, monkeypatch, *args: str):
    _env(dep, monkeypatch)
    return CliRunner().invoke(cli.app, list(args))


def _workbench(dep, monkeypatch, *, username: str, role: str) -> AppTest:
    """The Promotions page for a user whose sign-in remembered ``role``."""
    _env(dep, monkeypatch)
    at = AppTest.from_file("../app/workbench.py", default_timeout=120)
    at.session_state["user"] = {"username": username, "role": role}
    at.run()
    at.switch_page("../pages/promotions.py").run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def _reject_in_workbench(at: AppTest) -> AppTest:
    at.text_area(key="reason").input(REASON)
    (button,) = [b for b in at.button if b.label == "Reject"]
    button.click().run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def _rows(dep, action: str, outcome: str) -> list[AuditLog]:
    engine = dep.engine()
    try:
        with Session(engine) as s:
            query = select(AuditLog).where(AuditLog.action == action, AuditLog.outcome == outcome)
            return list(s.scalars(query.order_by(AuditLog.id)))
    finally:
        engine.dispose()


def _as_audited(row: AuditLog) -> tuple:
    """An audit row without what differs between two occurrences (id, time, event id)."""
    detail = {k: v for k, v in row.detail.items() if k != "event_id"}
    return (
        row.actor_id,
        row.actor,
        row.action,
        row.outcome,
        row.target_type,
        row.target_id,
        detail,
    )


def _rejections(dep) -> int:
    engine = dep.engine()
    try:
        with Session(engine) as s:
            events = s.scalars(select(PromotionEvent.action)).all()
            return sum(1 for a in events if a == PromotionAction.REJECT)
    finally:
        engine.dispose()


def test_a_refusal_is_audited_alike_from_the_api_the_cli_and_the_workbench(dep, monkeypatch):
    """Lee signed into the workbench as an ML lead, then an admin made them an analyst: the
    page still shows the decision form (it goes by the role at sign-in), but the core checks
    the database's role. Rejecting v2 is refused, and audited, identically everywhere."""
    at = _workbench(dep, monkeypatch, username="lee", role="ml_lead")
    assert "Reject" in {b.label for b in at.button}
    engine = dep.engine()
    with Session(engine) as s:
        lee = s.scalar(select(User).where(User.username == "lee"))
        lee_id, lee.role = lee.id, Role.ANALYST
        s.commit()
    engine.dispose()
    expected = "models.reject needs role ml_lead; lee is analyst"

    app = create_app(dep.settings(), with_demo=False, watch=False)
    with TestClient(app) as client:
        r = client.post("/api/v1/models/2/reject", json={"reason": REASON}, headers=dep.auth("lee"))
    assert r.status_code == 403 and r.json() == {"error": "permission_denied", "detail": expected}

    result = _cli(dep, monkeypatch, "models", "reject", "2", "--reason", REASON, "--user", "lee")
    assert isinstance(result.exception, PermissionDenied), result.output
    assert result.exception.detail == expected

    _reject_in_workbench(at)
    assert [e.value for e in at.error] == [expected]

    denied = _rows(dep, "models.reject", "denied")
    audited = (lee_id, "lee", "models.reject", "denied", None, None)
    # the refusal names the project it happened in: the default one, from every entry point
    detail = {"role": "analyst", "allowed": ["ml_lead"], "project_id": 1}
    assert [_as_audited(d) for d in denied] == [(*audited, detail)] * 3
    assert _rows(dep, "models.reject", "ok") == [] and _rejections(dep) == 0


def test_an_allowed_decision_is_audited_ok_alike_from_every_entry_point(dep, monkeypatch):
    app = create_app(dep.settings(), with_demo=False, watch=False)
    with TestClient(app) as client:
        r = client.post("/api/v1/models/2/reject", json={"reason": REASON}, headers=dep.auth("lee"))
    assert r.status_code == 200, r.text

    result = _cli(dep, monkeypatch, "models", "reject", "2", "--reason", REASON, "--user", "lee")
    assert result.exit_code == 0, result.output

    at = _reject_in_workbench(_workbench(dep, monkeypatch, username="lee", role="ml_lead"))
    assert not at.error and any("reject: recorded" in m.value for m in at.success)

    ok = _rows(dep, "models.reject", "ok")
    assert [_as_audited(o) for o in ok] == [_as_audited(ok[0])] * 3
    assert (ok[0].actor, ok[0].target_type, ok[0].target_id) == ("lee", "model_version", "2")
    assert _rows(dep, "models.reject", "denied") == [] and _rejections(dep) == 3


def test_user_administration_is_checked_and_audited_from_the_api_and_the_cli(dep, monkeypatch):
    """The API acts as the token's user (an admin may, an analyst may not); the CLI acts as the
    operator holding the database's credentials, audited as cli:<login>."""
    app = create_app(dep.settings(), with_demo=False, watch=False)
    body = {"username": "newbie", "role": "analyst", "password": "long-enough"}
    with TestClient(app) as client:
        refused = client.post("/api/v1/users", json=body, headers=dep.auth("analyst"))
        assert refused.status_code == 403
        assert refused.json()["detail"] == "users.create needs role admin; analyst is analyst"
        assert client.post("/api/v1/users", json=body, headers=dep.auth("admin")).status_code == 201
    made = _cli(
        dep, monkeypatch, "users", "create", "cli-made", "--role", "analyst", "--no-password"
    )
    assert made.exit_code == 0, made.output
    token = _cli(dep, monkeypatch, "tokens", "create", "--user", "cli-made")
    assert token.exit_code == 0, token.output
    (issued,) = _rows(dep, "tokens.create", "ok")
    revoked = _cli(dep, monkeypatch, "tokens", "revoke", issued.target_id)
    assert revoked.exit_code == 0, revoked.output

    operator = Operator.current().username
    assert operator.startswith("cli:")
    (denied,) = _rows(dep, "users.create", "denied")
    assert (denied.actor, denied.detail) == ("analyst", {"role": "analyst", "allowed": ["admin"]})
    created = [(o.actor, o.target_id, o.detail) for o in _rows(dep, "users.create", "ok")]
    assert created == [
        ("admin", "newbie", {"role": "analyst"}),
        (operator, "cli-made", {"role": "analyst"}),
    ]
    assert issued.actor == operator and issued.actor_id is None
    assert issued.detail["user"] == "cli-made"
    (gone,) = _rows(dep, "tokens.revoke", "ok")
    assert (gone.actor, gone.target_id) == (operator, issued.target_id)


def test_reads_and_the_retrain_trigger_are_refused_through_the_same_path(dep, monkeypatch):
    """What `need` used to refuse without a trace is audited now; the retrain trigger is
    checked before Prefect is asked (none runs here)."""
    app = create_app(dep.settings(), with_demo=False, watch=False)
    with TestClient(app) as client:
        expert = dep.auth("expert")
        r = client.get("/api/v1/review-queue", headers=expert)
        assert (r.status_code, r.json()["detail"]) == (
            403,
            "reading the review queue needs role analyst or ml_lead; expert is domain_expert",
        )
        assert client.get("/api/v1/models/2/proposal", headers=expert).status_code == 403
        retrain = client.post("/api/v1/retrain", json={"epochs": 1}, headers=dep.auth("analyst"))
        assert retrain.status_code == 403
        assert "starting a retrain needs role ml_lead" in retrain.json()["detail"]
        no_prefect = client.post("/api/v1/retrain", json={"epochs": 1}, headers=dep.auth("lead"))
        assert (no_prefect.status_code, no_prefect.json()["error"]) == (503, "config_error")
    assert [d.actor for d in _rows(dep, "review.queue", "denied")] == ["expert"]
    assert [d.actor for d in _rows(dep, "models.proposal", "denied")] == ["expert"]
    assert [d.actor for d in _rows(dep, "retrain.start", "denied")] == ["analyst"]
    assert _rows(dep, "retrain.start", "ok") == []  # Prefect refused: nothing started


# --------------------------------------------------------------------------- the rule itself


def test_can_is_the_rule_without_side_effects():
    assert can(Role.ADMIN, set()) and can("admin", {Role.ML_LEAD})
    assert can("ml_lead", {Role.ML_LEAD}) and can(Role.ANALYST, {"analyst", "ml_lead"})
    assert not can("analyst", {Role.ML_LEAD}) and not can(None, {Role.ANALYST})


def test_every_kind_of_actor_is_audited_alike(db_session):
    expert = create_user(session=db_session, username="ed", role=Role.DOMAIN_EXPERT)
    db_session.commit()
    actors = [expert, Principal(expert.id, "ed", Role.DOMAIN_EXPERT), ANONYMOUS]
    for actor in actors:
        with pytest.raises(PermissionDenied, match="probe needs role ml_lead"):
            authorize(db_session, actor=actor, allowed={Role.ML_LEAD}, action="probe")
    rows = db_session.scalars(select(AuditLog).where(AuditLog.action == "probe")).all()
    assert [(r.actor_id, r.actor, r.outcome) for r in rows] == [
        (expert.id, "ed", "denied"),
        (expert.id, "ed", "denied"),
        (None, "anonymous", "denied"),
    ]
    operator = Operator("root")
    authorize(db_session, actor=operator, allowed={Role.ADMIN}, action="probe")  # admin
    made = admin_create_user(session=db_session, actor=operator, username="op-made", role="analyst")
    (ok,) = db_session.scalars(select(AuditLog).where(AuditLog.action == "users.create")).all()
    assert (ok.actor_id, ok.actor, ok.outcome, ok.target_id) == (None, "cli:root", "ok", "op-made")
    assert made.role is Role.ANALYST

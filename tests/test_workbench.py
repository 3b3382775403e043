"""Every workbench page renders for every role (Streamlit AppTest), with real data: a champion,
a challenger, predictions, feedback, a review queue and training runs; numbers reach people
formatted, the prediction detail is a card (not JSON), and every page of an empty install
says what to do next."""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient
from helpers.data import SEED_SIZE
from helpers.serving import local_deploy, seed_and_register, wait_until
from streamlit.testing.v1 import AppTest

from app.api import create_app
from quarkflow_core.config import get_settings
from quarkflow_core.demo_data import demo_pngs

pytestmark = pytest.mark.integration
PAGES = [
    "overview",
    "predictions",
    "review",
    "datasets",
    "training",
    "compare",
    "simulator",
    "promotions",
]
VISIBLE = {
    "domain_expert": {"overview", "predictions", "promotions"},
    "analyst": set(PAGES),
    "ml_lead": set(PAGES),
}


@pytest.fixture(scope="module")
def filled(tmp_path_factory, trained_artifacts):
    """A deployment with traffic, feedback, a review queue and a challenger."""
    tmp = tmp_path_factory.mktemp("wb")
    dep = local_deploy(tmp, trained_artifacts["weak"])
    seed_and_register(dep, trained_artifacts["strong"])
    app = create_app(dep.settings(review_threshold=0.9), with_demo=False, watch=False)
    pngs, labels = demo_pngs(SEED_SIZE + 40)
    with TestClient(app) as client:
        for i in range(SEED_SIZE, SEED_SIZE + 40):
            r = client.post(
                "/api/v1/predictions",
                files={"file": ("x.png", pngs[i], "image/png")},
                headers=dep.auth("expert"),
            )
            verdict = "correct" if r.json()["label"] == labels[i] else "wrong"
            client.post(
                f"/api/v1/predictions/{r.json()['id']}/feedback",
                json={"verdict": verdict, "true_label": labels[i]},
                headers=dep.auth("expert"),
            )
        wait_until(
            lambda: client.get("/readyz").json()["checks"]["outbox"]["depth"] == 0, what="flush"
        )
    return dep


def _app(dep, monkeypatch, role: str | None) -> AppTest:
    for key, value in {
        "QF_DATABASE_URL": dep.database_url,
        "QF_STORAGE_URL": dep.storage_url,
        "QF_DATA_DIR": str(dep.data_dir),
    }.items():
        monkeypatch.setenv(key, value)
    get_settings.cache_clear()
    at = AppTest.from_file("../app/workbench.py", default_timeout=120)
    if role is not None:
        name = {"domain_expert": "expert", "analyst": "analyst", "ml_lead": "lead"}[role]
        at.session_state["user"] = {"username": name, "role": role}
    return at


def test_sign_in_form_and_wrong_password(filled, monkeypatch):
    at = _app(filled, monkeypatch, None).run()
    assert not at.exception
    at.text_input[0].input("lead")
    at.text_input[1].input("wrong-password")
    at.button[0].click().run()
    assert any("wrong username or password" in e.value for e in at.error)


@pytest.mark.parametrize("role", sorted(VISIBLE))
@pytest.mark.parametrize("page", PAGES)
def test_every_page_renders_for_every_role(filled, monkeypatch, role, page):
    at = _app(filled, monkeypatch, role).run()
    assert not at.exception, at.exception
    if page not in VISIBLE[role]:
        with pytest.raises(ValueError):
            at.switch_page(f"../pages/{page}.py").run()
        return
    at.switch_page(f"../pages/{page}.py").run()
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    assert at.title[0].value
    buttons = {b.label for b in at.button}
    if page == "promotions":
        assert ("Approve" in buttons) == (role == "ml_lead")
        if role != "ml_lead":
            assert any("Read-only" in i.value for i in at.info)
    assert not at.json, "pages show people cards and tables, not JSON dumps"


def _metrics(at: AppTest) -> dict[str, str]:
    return {m.label: m.value for m in at.metric}


def test_overview_numbers_are_formatted(filled, monkeypatch):
    at = _app(filled, monkeypatch, "analyst").run()
    at.switch_page("../pages/overview.py").run()
    assert not at.exception, [e.value for e in at.exception]
    shown = _metrics(at)
    assert shown["Predictions"] == "40"
    assert re.fullmatch(r"\d+\.\d%", shown["Live accuracy"]), shown
    for q in ("p50", "p95", "p99"):
        assert re.fullmatch(r"[\d,.]+ (ms|s)", shown[f"Latency {q}"]), shown


def test_prediction_detail_is_a_card(filled, monkeypatch):
    at = _app(filled, monkeypatch, "domain_expert").run()
    at.switch_page("../pages/predictions.py").run()
    assert not at.exception, [e.value for e in at.exception]
    assert not at.json
    shown = _metrics(at)
    assert shown["Predicted label"] in {str(d) for d in range(10)}
    assert re.fullmatch(r"[<>]?\d+\.\d%", shown["Calibrated confidence"]), shown
    facts = " ".join(m.value for m in at.markdown)
    assert "**Model** v" in facts and "**Latency**" in facts and " ms" in facts
    assert "**Review**" in facts and "UTC" in facts
    # every prediction in the fixture got a verdict from the expert: listed, not dumped
    assert re.search(r"\*\*(correct|wrong)\*\*.* by expert, ", facts), facts


@pytest.fixture(scope="module")
def empty(tmp_path_factory):
    """A fresh install: migrated, users only; no data set, model, prediction or run."""
    return local_deploy(tmp_path_factory.mktemp("wb-empty"), None)


EMPTY_HINTS = {
    "overview": ["No predictions yet: open the demo at"],
    "predictions": ["No predictions yet: open the demo at"],
    "review": ["The review queue is empty: low-confidence predictions"],
    "datasets": ["No dataset snapshot yet: run `quarkflow seed-demo`"],
    "training": ["No training run yet: ML leads start one with the form above"],
    "compare": ["a comparison needs two. To get another"],
    "simulator": ["No simulation of yours yet", "quarkflow simulate-loop --folder"],
    "promotions": ["No champion yet", "No promotion yet"],
}


@pytest.mark.parametrize("page", PAGES)
def test_every_empty_page_says_what_to_do_next(empty, monkeypatch, page):
    at = _app(empty, monkeypatch, "ml_lead").run()
    at.switch_page(f"../pages/{page}.py").run()
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    infos = " ".join(i.value for i in at.info)
    for hint in EMPTY_HINTS[page]:
        assert hint in infos, infos

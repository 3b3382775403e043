"""The workbench in a real browser (Debian Chromium driven by Playwright): an ML lead signs
in, opens the comparison, approves the challenger with a reason, and the champion changes in
the database and in the API's served version; an analyst sees no Approve button. Screenshots
of every page land in the test's folder (and in docs/screenshots with
QF_TEST_UPDATE_SCREENSHOTS=1)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest
from helpers.browser import launch, open_page, sign_in
from helpers.serving import ThreadedServer, free_port, local_deploy, seed_and_register, wait_until
from sqlalchemy.orm import Session

from app.api import create_app
from app.launcher import streamlit_argv
from quarkflow_core import registry
from quarkflow_core.demo_data import demo_pngs
from quarkflow_core.orchestration import stop_process
from quarkflow_core.users import create_user

pytestmark = [pytest.mark.browser, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[1]
PASSWORD = "browser-test-pw"


@pytest.fixture
def stack(tmp_path, trained_artifacts):
    dep = local_deploy(tmp_path, trained_artifacts["weak"])
    seed_and_register(dep, trained_artifacts["strong"])
    engine = dep.engine()
    with Session(engine) as s:
        for name, role in (("ada", "ml_lead"), ("ann", "analyst")):
            create_user(session=s, username=name, role=role, password=PASSWORD)
        s.commit()
    api = create_app(dep.settings(model_poll_s=0.2), with_demo=False)
    with ThreadedServer(api) as live:
        pngs, _ = demo_pngs(20)
        for data in pngs:
            httpx.post(
                live.url + "/api/v1/predictions",
                files={"file": ("d.png", data, "image/png")},
                headers=dep.auth("expert"),
            )
        port = free_port()
        env = dep.env(QF_API_URL=live.url)
        wb = subprocess.Popen(  # the same command as `quarkflow workbench`
            streamlit_argv(host="127.0.0.1", port=port),
            env=env,
            stdout=open(tmp_path / "wb.log", "wb"),  # noqa: SIM115 - closed with the process
            stderr=subprocess.STDOUT,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            wait_until(
                lambda: httpx.get(url + "/_stcore/health", timeout=2).status_code == 200,
                timeout=90,
                what="streamlit",
            )
            yield {
                "dep": dep,
                "engine": engine,
                "api": live.url,
                "wb": url,
                "shots": tmp_path / "shots",
            }
        finally:
            stop_process(wb, timeout_s=20)
            engine.dispose()


def _open(page, title: str, wait_text: str, shots: Path, name: str) -> None:
    open_page(page, title, wait_text)
    shots.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(shots / f"{name}.png"), full_page=True)


def test_ml_lead_approves_in_the_browser_and_serving_follows(stack):
    from playwright.sync_api import sync_playwright

    shots = stack["shots"]
    with sync_playwright() as p:
        browser = launch(p)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        sign_in(page, stack["wb"], "ada", PASSWORD)
        _open(page, "Overview", "Predictions", shots, "overview")
        # request outcomes come from the API's Prometheus metrics: 20 predictions succeeded
        page.get_by_text("API requests since it started").wait_for(timeout=30_000)
        assert "succeeded" in page.get_by_text("API requests since it started").inner_text()
        # what the API serves, on which backend and device, from its /readyz
        served = httpx.get(stack["api"] + "/readyz").json()["checks"]["model"]
        line = page.get_by_text("Serving v1 on").inner_text()
        assert served["backend"] in line and served["device"] in line, line
        page.screenshot(path=str(shots / "overview.png"), full_page=True)  # now drawn whole
        _open(page, "Predictions", "predictions match", shots, "predictions")
        _open(page, "Review queue", "Review queue", shots, "review")
        _open(page, "Datasets", "Images per class", shots, "datasets")
        _open(page, "Training runs", "Training runs", shots, "training")
        _open(page, "Model comparison", "v2 vs v1", shots, "compare")
        _open(page, "Promotions", "Policy:", shots, "promotions")
        page.get_by_label("Reason (kept for ever)").fill(
            "v2 learned from four times more digits; approving over the per-class check"
        )
        page.get_by_text("Override a failing policy").click()
        page.get_by_role("button", name="Approve").click()
        page.get_by_text("approve: recorded").wait_for(timeout=120_000)
        page.screenshot(path=str(shots / "approved.png"), full_page=True)

        analyst = browser.new_context().new_page()
        sign_in(analyst, stack["wb"], "ann", PASSWORD)
        _open(analyst, "Promotions", "Read-only", shots, "promotions-analyst")
        assert analyst.get_by_role("button", name="Approve").count() == 0
        browser.close()
    with Session(stack["engine"]) as s:
        assert registry.alias_of(session=s, alias="champion").version == 2
        (event,) = [e for e in registry.history(session=s) if e.to_version_id and e.actor == "ada"]
        assert "four times more digits" in event.reason
    wait_until(
        lambda: httpx.get(stack["api"] + "/readyz").json()["checks"]["model"]["version"] == 2,
        what="the API to serve v2",
    )
    if os.environ.get("QF_TEST_UPDATE_SCREENSHOTS"):
        target = ROOT / "docs" / "screenshots"
        target.mkdir(parents=True, exist_ok=True)
        for name in ("overview", "compare", "promotions", "review"):
            shutil.copy(shots / f"{name}.png", target / f"{name}.png")

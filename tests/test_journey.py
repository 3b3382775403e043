"""The whole loop in a new user's hands, in a real browser (Debian Chromium via Playwright),
against the processes `make demo` starts (the same Makefile target and launcher, on a temporary
state and free ports):

1. the domain expert opens the Gradio demo, uploads a digit, sees it, and records "wrong, it is
   X" on a low-confidence one;
2. the analyst signs in to the workbench, finds that verdict on the overview and the item in the
   review queue, and resolves another item;
3. the ML lead starts a retrain from Training runs; it runs on the worker; the challenger
   appears in Model comparison with its evidence; the ML lead approves it with a reason;
4. the Gradio demo, still open, names the new version (no restart);
5. one SIGTERM to `make` stops every process it started and frees every port.

Screenshots of each step land in the test's folder (and in docs/screenshots/ with
QF_TEST_UPDATE_SCREENSHOTS=1; the README tour uses them)."""

from __future__ import annotations

import io
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest
from PIL import Image as PILImage
from serving_helpers import free_port, wait_until
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from quarkflow_core.database import make_engine
from quarkflow_core.demo import DEMO_LEAD_PASSWORD, mnist_arrays, pending_traffic
from quarkflow_core.schema import Feedback, ModelVersion, ReviewItem
from quarkflow_core.supervisor import port_free

pytestmark = [pytest.mark.browser, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-sync"]
TRAFFIC = 200


@pytest.fixture
def demo(tmp_path):
    """`make demo` on a temporary state and free ports; yields its URLs; stops it with one
    SIGTERM to make and checks that nothing is left."""
    if not Path(CHROMIUM).exists():
        pytest.fail(
            "Debian chromium is missing: `make test` installs it (apt-get install chromium)"
        )
    state = tmp_path / "qf"
    ports = {"PORT": free_port(), "WB_PORT": free_port(), "PREFECT_PORT": free_port()}
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("QF_", "PREFECT_", "STORAGE_EMULATOR", "MAKE"))
    }
    env.update(
        QF_DATA_DIR=str(state),
        QF_DATABASE_URL=f"sqlite:///{state}/quarkflow.db",
        QF_STORAGE_URL=f"file://{state}/store",
    )
    log_path = tmp_path / "make-demo.log"
    log = open(log_path, "wb")  # noqa: SIM115 - closed below
    make = subprocess.Popen(
        [
            "make",
            "--no-print-directory",
            "demo",
            *(f"{k}={v}" for k, v in ports.items()),
            f"DEMO_ARGS=--epochs 2 --traffic {TRAFFIC}",
        ],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # like a terminal: make leads its own group
    )

    def started() -> bool:
        if make.poll() is not None:
            raise AssertionError("make demo exited:\n" + log_path.read_text()[-4000:])
        return "Ctrl-C stops everything." in log_path.read_text()

    try:
        wait_until(started, timeout=900, every=1, what="make demo to start everything")
        family = [make.pid, *(p.pid for p in psutil.Process(make.pid).children(recursive=True))]
        yield {
            "api": f"http://127.0.0.1:{ports['PORT']}",
            "wb": f"http://127.0.0.1:{ports['WB_PORT']}",
            "db": f"sqlite:///{state}/quarkflow.db",
            "shots": tmp_path / "shots",
            "log": log_path,
        }
        # 5. one SIGTERM to make (a supervisor, or `kill` from a second terminal)
        family += [p.pid for p in psutil.Process(make.pid).children(recursive=True)]
        make.send_signal(signal.SIGTERM)
        make.wait(timeout=30)

        def all_gone() -> bool:
            return not [
                p
                for p in set(family)
                if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
            ]

        wait_until(all_gone, timeout=90, every=0.5, what="every demo process to exit")
        assert all(port_free("127.0.0.1", p) for p in ports.values()), ports
        assert "stopping every Quarkflow process" in log_path.read_text()
    finally:
        if make.poll() is None:
            os.killpg(make.pid, signal.SIGKILL)
        for p in psutil.process_iter():  # never leave a stray behind, even on failure
            try:
                if p.environ().get("QF_DATA_DIR") == str(state):
                    p.kill()
            except psutil.Error:
                pass
        log.close()


def _blend(a: int, b: int) -> bytes:
    """Two MNIST digits overlaid: a genuinely ambiguous image a model is unsure of."""
    x, _ = mnist_arrays()
    arr = 0.55 * x[a].reshape(28, 28).astype(float) + 0.55 * x[b].reshape(28, 28)
    buf = io.BytesIO()
    PILImage.fromarray(np.clip(arr, 0, 255).astype(np.uint8), mode="L").save(buf, "PNG")
    return buf.getvalue()


def _shot(page, shots: Path, name: str) -> None:
    shots.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(shots / f"{name}.png"), full_page=True)


def _sign_in(page, url: str, user: str) -> None:
    page.goto(url)
    page.get_by_role("textbox", name="User name").fill(user)
    page.get_by_role("textbox", name="Password").fill(DEMO_LEAD_PASSWORD)
    page.get_by_role("button", name="Sign in").click()
    page.get_by_text(f"Signed in as {user}").wait_for(timeout=60_000)


def _open(page, title: str, wait_text: str) -> None:
    page.get_by_role("link", name=title).click()
    page.get_by_text(wait_text).first.wait_for(timeout=120_000)
    if page.locator('[data-testid="stPlotlyChart"]').count():
        page.locator(".js-plotly-plot .main-svg").first.wait_for(timeout=30_000)
    page.wait_for_timeout(1500)


def _preview_loaded(page) -> bool:
    return page.evaluate(
        """() => [...document.querySelectorAll('img')].some(
               i => i.src.includes('/demo/') && i.complete && i.naturalWidth > 0)"""
    )


def test_the_whole_loop_from_the_uis(demo, tmp_path):
    from playwright.sync_api import sync_playwright

    shots = demo["shots"]
    engine = make_engine(demo["db"])
    with Session(engine) as s:  # the living demo: real traffic and a review queue on first open
        assert s.scalar(select(func.count(ReviewItem.id))) > 0
        assert not pending_traffic(session=s, n=TRAFFIC)[1]  # all of it logged: no re-send

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)

        # 1. the domain expert: upload, see the picture, say "wrong, it is X"
        expert = browser.new_page(viewport={"width": 1300, "height": 900})
        image_failures: list[str] = []
        expert.on(
            "response",
            lambda r: (
                image_failures.append(r.url) if r.status >= 400 and "/file=" in r.url else None
            ),
        )
        note = None
        for a, b in [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9), (10, 11), (12, 13), (14, 15)]:
            expert.goto(demo["api"] + "/demo/")
            expert.get_by_text("Model v1").first.wait_for(timeout=60_000)
            upload = tmp_path / f"blend-{a}-{b}.png"
            upload.write_bytes(_blend(a, b))
            expert.locator("input[type=file]").first.set_input_files(str(upload))
            expert.get_by_text("confidence · model").first.wait_for(timeout=60_000)
            wait_until(lambda: _preview_loaded(expert), timeout=30, what="the uploaded image")
            note = expert.get_by_text("confidence · model").first.inner_text()
            if "low confidence" in note:
                break
        assert note and "low confidence" in note, note
        assert not image_failures, image_failures
        predicted = re.search(r"^(\S+) with", note).group(1)
        right = "8" if predicted != "8" else "3"
        expert.get_by_label("Right label").first.click()
        expert.get_by_role("option", name=right, exact=True).click()
        expert.get_by_role("button", name=re.compile("^Wrong")).click()
        expert.get_by_text("recorded as wrong").wait_for(timeout=30_000)
        _shot(expert, shots, "journey-expert")
        with Session(engine) as s:
            wait_until(
                lambda: s.scalar(
                    select(func.count(Feedback.id)).where(Feedback.verdict == "wrong")
                ),
                timeout=30,
                what="the verdict in the database",
            )

        # 2. the analyst: the verdict on the overview, the item in the queue, resolve another
        analyst = browser.new_page(viewport={"width": 1400, "height": 1400})
        _sign_in(analyst, demo["wb"], "demo-analyst")
        _open(analyst, "Overview", "Feedback")
        feedback = analyst.locator('[data-testid="stMetric"]').filter(has_text="Feedback")
        assert feedback.locator('[data-testid="stMetricValue"]').inner_text().strip() == "1"
        verdict = analyst.get_by_text(f"the model said {predicted}, it is {right}")
        verdict.wait_for(timeout=30_000)
        verdict.scroll_into_view_if_needed()
        _shot(analyst, shots, "journey-analyst-overview")
        _open(analyst, "Review queue", "most urgent first")
        with Session(engine) as s:
            disputed = s.scalar(select(ReviewItem).where(ReviewItem.reason == "user_disputed"))
            assert disputed is not None and disputed.state == "open"
        items = analyst.locator('[data-testid="stSelectbox"]').filter(has_text="Item")
        assert f"#{disputed.id}:" in items.inner_text()  # the expert's item ranks first
        items.click()
        other = analyst.get_by_role("option").nth(1)  # resolve the next one, not the expert's
        other_id = int(re.match(r"#(\d+):", other.inner_text()).group(1))
        other.click()
        analyst.get_by_role("button", name="Confirm / relabel").click()
        with Session(engine) as s:

            def resolved() -> bool:
                s.expire_all()
                return s.get(ReviewItem, other_id).state == "resolved"

            wait_until(resolved, timeout=30, what="the analyst's decision in the database")
            assert s.get(ReviewItem, disputed.id).state == "open"  # still waits for a decision
        analyst.get_by_text("most urgent first").first.wait_for(timeout=60_000)
        analyst.wait_for_timeout(1500)
        _shot(analyst, shots, "journey-analyst-review")

        # 3. the ML lead: retrain on the worker, compare, approve
        lead = browser.new_page(viewport={"width": 1400, "height": 1400})
        _sign_in(lead, demo["wb"], "demo-lead")
        _open(lead, "Training runs", "Start retrain on the worker")
        lead.get_by_label("Epochs").fill("2")
        lead.get_by_role("button", name="Start retrain on the worker").click()
        lead.get_by_text("retrain started on the worker").wait_for(timeout=60_000)
        _shot(lead, shots, "journey-lead-retrain")

        def challenger() -> bool:
            with Session(engine) as s:
                return s.scalar(select(func.count(ModelVersion.id))) >= 2

        wait_until(challenger, timeout=600, every=2, what="the retrain to register v2")
        _open(lead, "Training runs", "Training runs")
        _shot(lead, shots, "journey-lead-training")
        _open(lead, "Model comparison", "v2 vs v1")
        lead.get_by_text("McNemar").first.wait_for(timeout=60_000)
        _shot(lead, shots, "journey-lead-compare")
        _open(lead, "Promotions", "Policy:")
        lead.get_by_label("Reason (kept for ever)").fill(
            "v2 learned from the experts' verdicts and the review queue; approving after review"
        )
        override = lead.get_by_text("Override a failing policy")
        if override.count():
            override.click()
        lead.get_by_role("button", name="Approve").click()
        lead.get_by_text("approve: recorded").wait_for(timeout=120_000)
        _shot(lead, shots, "journey-lead-approved")
        browser_version = None

        # 4. the demo page, never reloaded, now names v2
        expert.get_by_text("Model v2").first.wait_for(timeout=60_000)
        browser_version = 2
        _shot(expert, shots, "journey-expert-v2")
        browser.close()
    assert browser_version == 2
    assert httpx.get(demo["api"] + "/readyz").json()["checks"]["model"]["version"] == 2
    engine.dispose()
    if os.environ.get("QF_TEST_UPDATE_SCREENSHOTS"):
        target = ROOT / "docs" / "screenshots"
        for png in shots.glob("journey-*.png"):
            shutil.copy(png, target / png.name)

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
5. one SIGTERM to `make` stops every process it started and frees every port;
6. a second `make demo` on the same state sends no traffic again, adds no row, and serves the
   approved version; one SIGTERM stops it too.

Screenshots of each step land in the test's folder (and in docs/screenshots/ with
QF_TEST_UPDATE_SCREENSHOTS=1; the README tour uses them)."""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil
import pytest
from helpers.browser import launch, open_page, sign_in
from helpers.serving import free_port, wait_until
from PIL import Image as PILImage
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from quarkflow_core.database import make_engine
from quarkflow_core.demo_data import DEMO_LEAD_PASSWORD, mnist_arrays, pending_traffic
from quarkflow_core.schema import (
    DEFAULT_PROJECT_ID,
    Feedback,
    Image,
    ModelVersion,
    Prediction,
    ReviewItem,
    User,
)
from quarkflow_core.supervisor import port_free

pytestmark = [pytest.mark.browser, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[1]
TRAFFIC = 200
DETECTION_IMAGES = 60  # the detection project's seed (45 train + 15 hold-out), trained briefly


@pytest.fixture
def demo(tmp_path):
    """Where `make demo` runs: a temporary state folder and free ports."""
    state = tmp_path / "qf"
    ports = {"PORT": free_port(), "WB_PORT": free_port(), "PREFECT_PORT": free_port()}
    yield {
        "state": state,
        "ports": ports,
        "api": f"http://127.0.0.1:{ports['PORT']}",
        "wb": f"http://127.0.0.1:{ports['WB_PORT']}",
        "db": f"sqlite:///{state}/quarkflow.db",
        "shots": tmp_path / "shots",
        "tmp": tmp_path,
    }
    for p in psutil.process_iter():  # never leave a stray behind, even on failure
        with contextlib.suppress(psutil.Error):
            if p.environ().get("QF_DATA_DIR") == str(state):
                p.kill()


@contextmanager
def running(demo: dict, name: str) -> Iterator[Path]:
    """`make demo` (the README's command) until the banner; then one SIGTERM to make, as a
    supervisor or `kill` from a second terminal sends, must stop every process it started and
    free every port. Yields the path of its output."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("QF_", "PREFECT_", "STORAGE_EMULATOR", "MAKE"))
    }
    state = demo["state"]
    env.update(
        QF_DATA_DIR=str(state),
        QF_DATABASE_URL=demo["db"],
        QF_STORAGE_URL=f"file://{state}/store",
    )
    log_path = demo["tmp"] / f"make-demo-{name}.log"
    with open(log_path, "wb") as log:
        make = subprocess.Popen(
            [
                "make",
                "--no-print-directory",
                "demo",
                *(f"{k}={v}" for k, v in demo["ports"].items()),
                f"DEMO_ARGS=--epochs 2 --traffic {TRAFFIC} --detector-epochs 2 "
                f"--detection-images {DETECTION_IMAGES}",
            ],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # like a terminal: make leads its own process group
        )
        try:
            deadline = time.monotonic() + 900
            while "Ctrl-C stops everything." not in log_path.read_text():
                if make.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError("make demo did not start:\n" + log_path.read_text())
                time.sleep(1)
            family = {make.pid, *(p.pid for p in psutil.Process(make.pid).children(True))}
            yield log_path
            family |= {p.pid for p in psutil.Process(make.pid).children(recursive=True)}
            make.send_signal(signal.SIGTERM)
            make.wait(timeout=90)

            def all_gone() -> bool:
                alive = [p for p in family if psutil.pid_exists(p)]
                return all(psutil.Process(p).status() == psutil.STATUS_ZOMBIE for p in alive)

            wait_until(all_gone, timeout=90, every=0.5, what="every demo process to exit")
            assert all(port_free("127.0.0.1", p) for p in demo["ports"].values())
            assert "stopping every Quarkflow process" in log_path.read_text()
        finally:
            if make.poll() is None:
                os.killpg(make.pid, signal.SIGKILL)


def _counts(engine) -> dict[str, int]:
    with Session(engine) as s:
        return {
            t.__tablename__: s.scalar(select(func.count()).select_from(t))
            for t in (Prediction, ReviewItem, Feedback, ModelVersion, User, Image)
        }


def _poll(engine, query) -> Callable[[], Any]:
    """A check that reads in a fresh transaction each time (SQLite keeps a snapshot)."""

    def check():
        with Session(engine) as s:
            return s.scalar(query)

    return check


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


def _preview_loaded(page) -> bool:
    return page.evaluate(
        """() => [...document.querySelectorAll('img')].some(
               i => i.src.includes('/demo/') && i.complete && i.naturalWidth > 0)"""
    )


def _detection_journey(browser, demo: dict, engine) -> None:
    from quarkflow_core.detection.demo import DEMO_PROJECT
    from quarkflow_core.detection.synth import digits_on_photos, encode_png

    photo = demo["tmp"] / "digits-on-a-photo.png"
    photo.write_bytes(encode_png(digits_on_photos(1, seed=777)[0]))
    page = browser.new_page(viewport={"width": 1300, "height": 900})
    page.goto(demo["api"] + "/demo/")
    page.get_by_text("Model v").first.wait_for(timeout=60_000)
    page.get_by_label("Project").click()
    page.get_by_role("option", name=DEMO_PROJECT, exact=True).click()
    page.locator("#qf-boxes").wait_for(state="visible", timeout=60_000)
    page.locator("#qf-boxes input[type=file]").set_input_files(str(photo))
    page.get_by_text(re.compile(r"objects? at score")).wait_for(timeout=60_000)
    page.wait_for_timeout(500)
    page.get_by_role("button", name="Accept all").click()
    page.get_by_text("every box recorded as correct").wait_for(timeout=30_000)
    _shot(page, demo["shots"], "journey-expert-detection")
    in_project = (
        select(func.count(Feedback.id))
        .join(Prediction, Prediction.id == Feedback.prediction_id)
        .where(Prediction.project_id != DEFAULT_PROJECT_ID, Feedback.verdict == "correct")
    )
    wait_until(_poll(engine, in_project), timeout=30, what="the detection verdict")
    with Session(engine) as s:
        pred = s.scalars(
            select(Prediction).where(Prediction.project_id != DEFAULT_PROJECT_ID)
        ).first()
        assert pred is not None and pred.boxes is not None


def _journey(demo: dict, engine) -> None:
    from playwright.sync_api import sync_playwright

    shots, tmp_path = demo["shots"], demo["tmp"]

    with sync_playwright() as p:
        browser = launch(p)

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
        wait_until(
            _poll(engine, select(func.count(Feedback.id)).where(Feedback.verdict == "wrong")),
            timeout=30,
            what="the verdict in the database",
        )

        # 2. the analyst: the verdict on the overview, the item in the queue, resolve another
        analyst = browser.new_page(viewport={"width": 1400, "height": 1400})
        sign_in(analyst, demo["wb"], "demo-analyst", DEMO_LEAD_PASSWORD)
        assert analyst.get_by_role("button", name="Deploy").count() == 0  # viewer mode
        open_page(analyst, "Overview", "Feedback")
        feedback = analyst.locator('[data-testid="stMetric"]').filter(has_text="Feedback")
        assert feedback.locator('[data-testid="stMetricValue"]').inner_text().strip() == "1"
        verdict = analyst.get_by_text(f"the model said {predicted}, it is {right}")
        verdict.wait_for(timeout=30_000)
        verdict.scroll_into_view_if_needed()
        _shot(analyst, shots, "journey-analyst-overview")
        open_page(analyst, "Review queue", "items to do")
        # the expert's answer settled that image: labelled with what they said, out of the queue
        with Session(engine) as s:
            settled = s.scalars(select(ReviewItem).where(ReviewItem.state == "resolved")).all()
        assert [(i.resolved_label, i.note) for i in settled] == [(right, "settled by feedback")]
        analyst.locator('[data-testid="stSelectbox"]').filter(has_text="Item").click()
        options = analyst.get_by_role("option")
        listed = [options.nth(k).inner_text() for k in range(options.count())]
        assert listed and not any(t.startswith(f"#{settled[0].id}:") for t in listed), listed
        other = options.nth(0)  # the next item of work: the analyst settles it
        other_id = int(re.match(r"#(\d+):", other.inner_text()).group(1))
        other.click()
        analyst.get_by_role("button", name="Confirm / relabel").click()
        state_of = select(ReviewItem.state).where(ReviewItem.id == other_id)
        wait_until(
            lambda: _poll(engine, state_of)() == "resolved",
            timeout=30,
            what="the analyst's decision in the database",
        )
        analyst.get_by_text("items to do").first.wait_for(timeout=60_000)
        analyst.wait_for_timeout(1500)
        _shot(analyst, shots, "journey-analyst-review")

        # 3. the ML lead: retrain on the worker, compare, approve
        lead = browser.new_page(viewport={"width": 1400, "height": 1400})
        sign_in(lead, demo["wb"], "demo-lead", DEMO_LEAD_PASSWORD)
        open_page(lead, "Training runs", "Start retrain on the worker")
        lead.get_by_label("Epochs").fill("2")
        lead.get_by_role("button", name="Start retrain on the worker").click()
        lead.get_by_text("retrain started on the worker").wait_for(timeout=60_000)
        _shot(lead, shots, "journey-lead-retrain")

        versions = _poll(
            engine,
            select(func.count(ModelVersion.id)).where(
                ModelVersion.project_id == DEFAULT_PROJECT_ID
            ),
        )
        wait_until(lambda: versions() >= 2, timeout=600, every=2, what="the retrain to register v2")
        open_page(lead, "Training runs", "Training runs")
        _shot(lead, shots, "journey-lead-training")
        open_page(lead, "Model comparison", "v2 vs v1")
        lead.get_by_text("McNemar").first.wait_for(timeout=60_000)
        _shot(lead, shots, "journey-lead-compare")
        open_page(lead, "Promotions", "Policy:")
        lead.get_by_label("Reason (kept for ever)").fill(
            "v2 learned from the experts' verdicts and the review queue; approving after review"
        )
        override = lead.get_by_text("Override a failing policy")
        if override.count():
            override.click()
        lead.get_by_role("button", name="Approve").click()
        lead.get_by_text("approve: recorded").wait_for(timeout=120_000)
        _shot(lead, shots, "journey-lead-approved")

        # 4. the demo page, never reloaded, now names v2
        expert.get_by_text("Model v2").first.wait_for(timeout=60_000)
        _shot(expert, shots, "journey-expert-v2")

        # 5. the detection project make demo created: boxes drawn on the photo, accepted in
        # one click, the verdict logged in that project
        _detection_journey(browser, demo, engine)
        browser.close()
    assert httpx.get(demo["api"] + "/readyz").json()["checks"]["model"]["version"] == 2


@pytest.mark.timeout(2400)
def test_the_whole_loop_from_the_uis(demo):
    engine = make_engine(demo["db"])
    with running(demo, "first"):
        # a living demo on first open: real traffic, a review queue, all of it logged
        assert _counts(engine)["review_items"] > 0
        with Session(engine) as s:
            assert not pending_traffic(session=s, n=TRAFFIC)[1]
        _journey(demo, engine)
    after = _counts(engine)
    # a second `make demo` on the same state adds nothing twice and serves the new champion
    with running(demo, "second") as log:
        assert "none sent again" in log.read_text()
        assert _counts(engine) == after
        assert httpx.get(demo["api"] + "/readyz").json()["checks"]["model"]["version"] == 2
    engine.dispose()
    shots = demo["shots"]
    if os.environ.get("QF_TEST_UPDATE_SCREENSHOTS"):
        target = ROOT / "docs" / "screenshots"
        for png in shots.glob("journey-*.png"):
            shutil.copy(png, target / png.name)

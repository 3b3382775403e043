"""What the browser tests share: Debian's Chromium driven by Playwright (never `playwright
install`), and signing in to the workbench."""

from __future__ import annotations

from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def launch(playwright):
    """Debian's Chromium; a clear failure when it is missing."""
    if not Path(CHROMIUM).exists():
        pytest.fail("Debian chromium is missing: `make test` installs it (apt-get install)")
    return playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)


def sign_in(page, url: str, user: str, password: str) -> None:
    """Sign in to the workbench at ``url`` and wait for the signed-in sidebar."""
    page.goto(url)
    page.get_by_role("textbox", name="User name").fill(user)
    page.get_by_role("textbox", name="Password").fill(password)
    page.get_by_role("button", name="Sign in").click()
    page.get_by_text(f"Signed in as {user}").wait_for(timeout=60_000)


def open_page(page, title: str, wait_text: str) -> None:
    """Click the sidebar link ``title`` and wait until that page, charts included, is drawn.

    The wait is on the page's own heading, not on the link's text: until the heading shows,
    the previous page (and its charts) may still be on screen. Plotly in columns draws only
    once scrolled into view, so each chart is brought into view and waited for."""
    page.get_by_role("link", name=title).click()
    page.get_by_role("heading", name=title).first.wait_for(timeout=120_000)
    # attached, not visible: the text may be a chart's title below the fold (drawn hidden until
    # scrolled to, below) or a data grid's header (an accessibility table that is never visible)
    page.get_by_text(wait_text).first.wait_for(state="attached", timeout=120_000)
    page.wait_for_timeout(1000)  # elements drawn after the heading in the same script run
    charts = page.locator('[data-testid="stPlotlyChart"]')
    for i in range(charts.count()):
        charts.nth(i).scroll_into_view_if_needed(timeout=30_000)
        charts.nth(i).locator(".main-svg").first.wait_for(timeout=60_000)
    page.mouse.wheel(0, -10_000)
    page.wait_for_timeout(500)

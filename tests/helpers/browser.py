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

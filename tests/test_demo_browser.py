"""The Gradio demo in a real browser (Debian Chromium driven by Playwright): the image the user
uploads or picks from the examples is shown (its <img> loads, status 200), served directly at
/demo and behind a reverse proxy that serves the API under /qf (QF_PUBLIC_API_URL), and the
"Model vN" line follows a hot swap without a reload. Screenshots land in the test's folder."""

from __future__ import annotations

import contextlib
from pathlib import Path

import httpx
import pytest
from helpers.browser import launch
from helpers.serving import ThreadedServer, free_port, local_deploy, seed_and_register, wait_until
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from app.api import create_app
from quarkflow_core import registry
from quarkflow_core.demo_data import demo_pngs
from quarkflow_core.schema import User

pytestmark = [pytest.mark.browser, pytest.mark.slow]
PREVIEW = "#qf-image img"
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "upgrade", "trailer"}


@pytest.fixture
def digit_png(tmp_path) -> Path:
    path = tmp_path / "my-digit.png"
    path.write_bytes(demo_pngs(1)[0][0])
    return path


@pytest.fixture
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = launch(p)
        try:
            yield chromium
        finally:
            chromium.close()


def prefix_proxy(upstream: str, prefix: str) -> Starlette:
    """A reverse proxy serving the API under ``prefix``, like nginx's ``location /qf/
    { proxy_pass http://api/; }`` with the usual ``proxy_set_header`` lines: strips the
    prefix, passes the browser's Host and sets X-Forwarded-Host / -Proto / -Prefix."""
    client = httpx.AsyncClient(base_url=upstream, timeout=None)

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette):
        yield
        await client.aclose()

    async def forward(request: Request) -> Response:
        path = request.url.path
        if not path.startswith(prefix + "/"):
            return PlainTextResponse("outside the proxied prefix", status_code=404)
        headers = {k: v for k, v in request.headers.items() if k not in HOP_BY_HOP}
        headers |= {
            "x-forwarded-host": request.headers["host"],
            "x-forwarded-proto": request.url.scheme,
            "x-forwarded-prefix": prefix,
        }
        upstream_request = client.build_request(
            request.method,
            path[len(prefix) :],
            params=request.url.query,
            headers=headers,
            content=await request.body(),
        )
        answer = await client.send(upstream_request, stream=True)  # stream: Gradio uses SSE
        response = StreamingResponse(
            answer.aiter_raw(),
            status_code=answer.status_code,
            background=BackgroundTask(answer.aclose),
        )
        response.raw_headers = [
            (k.encode("latin-1"), v.encode("latin-1"))
            for k, v in answer.headers.multi_items()
            if k not in HOP_BY_HOP and k != "content-length"
        ]
        return response

    async def health(_request: Request) -> Response:
        return PlainTextResponse("ok")  # the proxy's own, for ThreadedServer

    methods = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
    return Starlette(
        routes=[Route("/healthz", health), Route("/{path:path}", forward, methods=methods)],
        lifespan=lifespan,
    )


class DemoPage:
    """The demo open in a browser tab, recording the status of every image file it loads."""

    def __init__(self, browser, url: str, shots: Path) -> None:
        self.page = browser.new_page(viewport={"width": 1280, "height": 900})
        self.shots = shots
        self.files: dict[str, int] = {}
        self.page.on("response", self._seen)
        self.page.goto(url)
        self.page.get_by_text("Model v").wait_for(timeout=60_000)

    def __enter__(self) -> DemoPage:
        return self

    def __exit__(self, *exc) -> None:
        self.page.close()  # ends its event stream, so the server can stop at once

    def _seen(self, response) -> None:
        if "/gradio_api/file=" in response.url:
            self.files[response.url] = response.status

    def upload(self, png: Path) -> None:
        self.page.locator("#qf-image input[type=file]").set_input_files(str(png))

    def pick_example(self, name: str) -> None:
        self.page.locator(f"button.gallery-item img[src*='{name}']").click()

    def clear(self) -> None:
        """Remove the image: the prediction note goes, so the next one is unambiguous."""
        self.page.get_by_role("button", name="Remove Image").click()
        self.page.get_by_text(" · model v").wait_for(state="hidden", timeout=30_000)

    def wait_for_prediction(self, version: int) -> None:
        self.page.get_by_text(f"model v{version} ·").wait_for(timeout=60_000)

    def assert_preview_shows(self, name: str, url_prefix: str, shot: str) -> str:
        """The preview <img> shows ``name``: it loaded pixels, from the public URL, status 200."""
        preview = self.page.locator(PREVIEW).first
        wait_until(
            lambda: name in (preview.get_attribute("src") or ""), timeout=30, what="the preview"
        )
        src = preview.get_attribute("src")
        assert src.startswith(url_prefix + "/gradio_api/file="), src
        wait_until(
            lambda: preview.evaluate("img => img.complete && img.naturalWidth > 0"),
            timeout=30,
            what=f"the preview of {name} to load",
        )
        assert self.files.get(src) == 200, (src, self.files)
        self.shots.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(self.shots / f"{shot}.png"), full_page=True)
        return src

    def assert_no_broken_files(self) -> None:
        broken = {url: code for url, code in self.files.items() if code != 200}
        assert not broken, broken


def _approve(dep, version, tmp_path: Path) -> None:
    engine = dep.engine()
    try:
        with Session(engine, expire_on_commit=False) as s:
            registry.approve(
                session=s,
                storage=dep.storage(),
                version=version,
                user=s.scalar(select(User).where(User.username == "lead")),
                reason="stronger model; the open demo page must follow",
                cache_root=tmp_path / "lead",
                override=True,  # the strict default policy flags a class-recall drop
            )
    finally:
        engine.dispose()


def test_demo_shows_the_image_and_follows_a_hot_swap(
    tmp_path, trained_artifacts, browser, digit_png
):
    dep = local_deploy(tmp_path, trained_artifacts["weak"])
    candidate = seed_and_register(dep, trained_artifacts["strong"], as_challenger=False)
    api = create_app(dep.settings(anonymous_demo=True, model_poll_s=0.2), with_demo=True)
    with (
        ThreadedServer(api) as live,
        DemoPage(browser, live.url + "/demo", tmp_path / "shots") as demo,
    ):
        root = live.url + "/demo"
        demo.page.get_by_text("Model v1").wait_for()
        demo.upload(digit_png)
        demo.wait_for_prediction(1)
        demo.assert_preview_shows(digit_png.name, root, "uploaded")

        _approve(dep, candidate, tmp_path)
        demo.page.get_by_text("Model v2").wait_for(timeout=30_000)  # the open page, no reload

        demo.clear()
        demo.pick_example("digit-7")
        demo.wait_for_prediction(2)
        demo.assert_preview_shows("digit-7", root, "example-after-swap")
        demo.assert_no_broken_files()


def test_demo_shows_the_image_behind_a_path_prefix(tmp_path, trained_artifacts, browser, digit_png):
    port = free_port()
    public = f"http://127.0.0.1:{port}/qf"
    dep = local_deploy(tmp_path, trained_artifacts["weak"])
    api = create_app(dep.settings(anonymous_demo=True, public_api_url=public), with_demo=True)
    with (
        ThreadedServer(api) as live,
        ThreadedServer(prefix_proxy(live.url, "/qf"), port=port),
        DemoPage(browser, public + "/demo", tmp_path / "shots") as demo,  # no slash: redirected
    ):
        assert demo.page.url == public + "/demo/"
        demo.upload(digit_png)
        demo.wait_for_prediction(1)
        demo.assert_preview_shows(digit_png.name, public + "/demo", "uploaded-behind-proxy")

        demo.clear()
        demo.pick_example("digit-3")
        demo.wait_for_prediction(1)
        demo.assert_preview_shows("digit-3", public + "/demo", "example-behind-proxy")
        demo.assert_no_broken_files()

"""Pure ASGI middleware around every route: per-route body limits, the last-resort JSON 500,
and Prometheus request metrics."""

import json
import logging
import time
import types
import typing
from collections.abc import Iterator, Sequence
from collections.abc import Set as AbstractSet
from typing import Any

from fastapi.params import File as FileParam
from fastapi.routing import APIRoute, RouteContext, iter_route_contexts
from starlette.routing import Match

from quarkflow_core.service import PredictionService

log = logging.getLogger("quarkflow.api")


class _TooLarge(Exception):
    pass


def _many(annotation: Any) -> bool:
    """Whether a parameter's annotation is a sequence (``list[UploadFile]``, optional or not)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType, typing.Annotated):
        return any(_many(arg) for arg in typing.get_args(annotation))
    return isinstance(origin, type) and issubclass(origin, Sequence | AbstractSet)


def _body_params(dependant: Any) -> Iterator[Any]:
    yield from dependant.body_params
    for sub in dependant.dependencies:
        yield from _body_params(sub)


class BodyLimits:
    """The largest request body each /api route accepts. A route with ``File`` parameters
    (multipart uploads) takes its files, ``per_file`` each (``max_files`` for a list of
    them), plus 64 KiB of multipart framing and form fields; every other route (JSON, or no
    body) ``json_bytes``. The upload routes are read from ``routes`` (the app's own list,
    routes of included routers too) on first use, so routes declared after the middleware
    count too."""

    FRAMING = 64 * 1024

    def __init__(self, routes: list, *, json_bytes: int, per_file: int, max_files: int) -> None:
        self.routes = routes
        self.json_bytes = json_bytes
        self.per_file = per_file
        self.max_files = max_files
        self._uploads: list[tuple[RouteContext, int]] | None = None

    def uploads(self) -> list[tuple[RouteContext, int]]:
        """(route, limit) for every route with file parameters. An included router is one
        entry of ``routes``; ``iter_route_contexts`` yields its routes as the app matches them
        (prefix included)."""
        if self._uploads is None:
            found = []
            for route in iter_route_contexts(self.routes):
                if not isinstance(route.original_route, APIRoute):
                    continue
                files = sum(
                    self.max_files if _many(field.field_info.annotation) else 1
                    for field in _body_params(route.dependant)
                    if isinstance(field.field_info, FileParam)
                )
                if files:
                    found.append((route, files * self.per_file + self.FRAMING))
            self._uploads = found
        return self._uploads

    def for_scope(self, scope: dict) -> tuple[int, str]:
        """(limit in bytes, what sets it) for a request."""
        for route, limit in self.uploads():
            if route.matches(scope)[0] == Match.FULL:
                return limit, "QF_MAX_UPLOAD_BYTES per file"
        return self.json_bytes, "QF_MAX_JSON_BYTES"


class RouteNames:
    """The route template a request matched, prefix included, for the metrics: a router
    included twice (``/api/v1`` and ``/api/v1/projects/{project}``) hands its routes to both
    mounts, so ``scope["route"]`` alone cannot tell them apart. Built from ``routes`` on first
    use, like ``BodyLimits``."""

    def __init__(self, routes: list) -> None:
        self.routes = routes
        self._mounts: dict[int, list[RouteContext]] | None = None

    def name(self, scope: dict) -> str | None:
        route = scope.get("route")
        if route is None:
            return None
        if self._mounts is None:
            mounts: dict[int, list[RouteContext]] = {}
            for ctx in iter_route_contexts(self.routes):
                mounts.setdefault(id(ctx.original_route), []).append(ctx)
            self._mounts = mounts
        found = self._mounts.get(id(route), [])
        if len(found) == 1:
            return found[0].path
        for ctx in found:
            if ctx.matches(scope)[0] == Match.FULL:
                return ctx.path
        return getattr(route, "path", None)


class EdgeMiddleware:
    """Pure ASGI, outside every route:

    - caps request bodies under /api per route (``BodyLimits``): 413 ``too_large`` before
      anything is read when Content-Length says so, and for a chunked body as soon as it
      passes the limit (whatever the app answered to the body it could not read is replaced
      by the 413);
    - answers an unexpected exception with a JSON 500 ``internal_error`` and does not re-raise
      it, so uvicorn keeps the client's keep-alive connection open;
    - records Prometheus request counts and latency by route template."""

    def __init__(self, app: Any, *, service: PredictionService, limits: BodyLimits) -> None:
        self.app = app
        self.service = service
        self.limits = limits
        self.names = RouteNames(limits.routes)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        state = {"code": 500, "started": False, "overflow": False}
        path = scope.get("path", "")
        try:
            limit, source = self.limits.for_scope(scope) if path.startswith("/api/") else (0, "")
            too_large = (
                f"the request body exceeds {limit:,} bytes, the limit of this route ({source})"
            )

            async def send_wrapper(message: dict) -> None:
                if state["overflow"]:
                    return  # the app's answer to a body it could not read: the 413 replaces it
                if message["type"] == "http.response.start":
                    state["code"] = message["status"]
                    state["started"] = True
                await send(message)

            receive_fn = receive
            if limit:
                length = dict(scope.get("headers") or []).get(b"content-length")
                if length is not None and length.isdigit() and int(length) > limit:
                    await self._answer(send, state, 413, "too_large", too_large)
                    return
                seen = 0

                async def receive_fn() -> dict:
                    nonlocal seen
                    message = await receive()
                    if message["type"] == "http.request":
                        seen += len(message.get("body", b""))
                        if seen > limit:
                            state["overflow"] = True
                            raise _TooLarge
                    return message

            try:
                await self.app(scope, receive_fn, send_wrapper)
            except Exception as exc:  # not re-raised: uvicorn would drop the connection
                if not state["overflow"]:
                    log.exception("unhandled error in %s %s", scope.get("method"), path)
                    if not state["started"]:
                        detail = f"unexpected {type(exc).__name__}"
                        await self._answer(send, state, 500, "internal_error", detail)
            if state["overflow"] and not state["started"]:
                await self._answer(send, state, 413, "too_large", too_large)
        finally:
            self._observe(scope, path, state["code"], started)

    @staticmethod
    async def _answer(send: Any, state: dict, status: int, code: str, detail: str) -> None:
        state["code"], state["started"] = status, True
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        body = json.dumps({"error": code, "detail": detail}).encode()
        await send({"type": "http.response.body", "body": body})

    def _observe(self, scope: dict, path: str, code: int, started: float) -> None:
        name = self.names.name(scope)
        if name is None:
            name = "/demo" if path.startswith("/demo") else "unmatched"
        m = self.service.metrics
        m.requests.labels(name, scope.get("method", "?"), str(code)).inc()
        m.latency.labels(name).observe(time.perf_counter() - started)

"""The one ASGI app: REST API (OpenAPI at /docs), Gradio demo at /demo, health and metrics.

Thin: every route authenticates, calls ``quarkflow_core`` and shapes JSON. Errors are
``{"error": <code>, "detail": <sentence>}`` with a 4xx/5xx status."""

import json
import logging
import time
import types
import typing
from collections.abc import Iterator, Sequence
from collections.abc import Set as AbstractSet
from contextlib import asynccontextmanager
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, File, Query, Request, UploadFile
from fastapi import Path as FastApiPath
from fastapi.exceptions import RequestValidationError
from fastapi.params import File as FileParam
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import AfterValidator, BaseModel, Field
from sqlalchemy.exc import OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from quarkflow_core import __version__
from quarkflow_core.config import Settings, get_settings
from quarkflow_core.database import begin_write
from quarkflow_core.errors import (
    AuthenticationFailed,
    InvalidInput,
    NotFound,
    PermissionDenied,
    QuarkflowError,
)
from quarkflow_core.schema import Role, User
from quarkflow_core.service import ANONYMOUS, PredictionService, Principal

log = logging.getLogger("quarkflow.api")
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}

STATUS = {
    "empty_file": 422,
    "corrupt_image": 422,
    "not_an_image": 415,
    "unsupported_format": 415,
    "unsupported_media_type": 415,
    "content_type_mismatch": 415,
    "polyglot": 415,
    "too_large": 413,
    "too_many_pixels": 413,
    "too_many_files": 413,
    "no_file": 422,
    "unknown_label": 422,
    "invalid_input": 422,
    "policy_failed": 409,
    "not_found": 404,
    "permission_denied": 403,
    "authentication_failed": 401,
    "conflict": 409,
    "already_exists": 409,
    "artifact_integrity": 409,
    "no_model": 503,
    "busy": 503,
    "database_unavailable": 503,
    "storage_error": 503,
    "config_error": 503,
    "link_expired": 403,
    "bad_signature": 403,
    "labelstudio_error": 502,
    "labelstudio_unavailable": 503,
}


def error_response(status: int, code: str, detail: str) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse({"error": code, "detail": detail}, status_code=status, headers=headers)


# --------------------------------------------------------------------------- schemas


class TopK(BaseModel):
    label: str
    confidence: float


class PredictionOut(BaseModel):
    id: str = Field(description="Prediction id (use it for feedback).")
    label: str
    confidence: float = Field(description="Calibrated probability of the label.")
    topk: list[TopK]
    model_version: int | None
    latency_ms: float = Field(description="Server-side time for this image.")
    review: bool = Field(description="True when it went to the review queue.")
    image_sha256: str


class BatchOut(BaseModel):
    predictions: list[PredictionOut]


def _storable(value: str | None) -> str | None:
    """Refuse at the edge what the database would refuse after the request was acknowledged:
    NUL and other control characters (tabs and newlines are fine)."""
    if value is not None and any(ord(c) < 32 and c not in "\t\n\r" for c in value):
        raise ValueError("must not contain NUL or other control characters")
    return value


Text = Annotated[str, AfterValidator(_storable)]


class FeedbackIn(BaseModel):
    verdict: str = Field(description="correct | wrong", examples=["wrong"])
    true_label: Text | None = Field(None, max_length=128, examples=["7"])
    comment: Text | None = Field(None, max_length=2000)


class FeedbackOut(BaseModel):
    id: str
    prediction_id: str
    verdict: str
    true_label: str | None
    durable: bool


class DecisionIn(BaseModel):
    reason: Text = Field(min_length=1, max_length=4000)
    override: bool = False


class RollbackIn(BaseModel):
    reason: Text = Field(min_length=1, max_length=4000)
    to: Text | None = Field(None, description="Version (3, v3); default: previous champion.")


class UserIn(BaseModel):
    username: Text = Field(min_length=2, max_length=64)
    role: str
    password: Text | None = Field(None, min_length=8, max_length=256)


class ErrorOut(BaseModel):
    error: str
    detail: str


ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorOut} for code in (401, 403, 404, 409, 413, 415, 422, 503)
}


# --------------------------------------------------------------------------- middleware


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
    body) ``json_bytes``. The upload routes are read from ``routes`` (the app's own list) on
    first use, so routes declared after the middleware count too."""

    FRAMING = 64 * 1024

    def __init__(self, routes: list, *, json_bytes: int, per_file: int, max_files: int) -> None:
        self.routes = routes
        self.json_bytes = json_bytes
        self.per_file = per_file
        self.max_files = max_files
        self._uploads: list[tuple[APIRoute, int]] | None = None

    def uploads(self) -> list[tuple[APIRoute, int]]:
        """(route, limit) for every route with file parameters."""
        if self._uploads is None:
            found = []
            for route in self.routes:
                if not isinstance(route, APIRoute):
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
        route = scope.get("route")
        name = getattr(route, "path", None)
        if name is None:
            name = "/demo" if path.startswith("/demo") else "unmatched"
        m = self.service.metrics
        m.requests.labels(name, scope.get("method", "?"), str(code)).inc()
        m.latency.labels(name).observe(time.perf_counter() - started)


# --------------------------------------------------------------------------- app


def create_app(
    settings: Settings | None = None,
    *,
    host: str | None = None,
    service: PredictionService | None = None,
    with_demo: bool = True,
    watch: bool = True,
) -> FastAPI:
    settings = settings or get_settings()
    service = service or PredictionService(settings)
    anonymous = (
        settings.anonymous_demo if settings.anonymous_demo is not None else host in LOCAL_HOSTS
    )

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        service.start(watch=watch)
        try:
            yield
        finally:
            service.stop()

    app = FastAPI(
        title="Quarkflow API",
        version=__version__,
        description="Predictions with durable logging and feedback, the review queue, and the "
        "model registry (promotion needs role ml_lead). Authenticate with "
        "`Authorization: Bearer <token>` (`quarkflow tokens create`).",
        lifespan=lifespan,
    )
    app.state.service = service
    app.state.anonymous = anonymous
    limits = BodyLimits(
        app.router.routes,
        json_bytes=settings.max_json_bytes,
        per_file=settings.max_upload_bytes,
        max_files=settings.max_batch_files,
    )
    app.add_middleware(EdgeMiddleware, service=service, limits=limits)

    @app.exception_handler(QuarkflowError)
    async def _core_error(_request: Request, exc: QuarkflowError) -> JSONResponse:
        return error_response(STATUS.get(exc.code, 400), exc.code, exc.detail)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for err in exc.errors()[:5]:
            where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
            parts.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
        return error_response(422, "invalid_request", "; ".join(parts) or "invalid request")

    @app.exception_handler(OperationalError)
    async def _database_down(_request: Request, exc: OperationalError) -> JSONResponse:
        log.warning("database unavailable: %s", str(exc).splitlines()[0][:200])
        return error_response(
            503, "database_unavailable", "the database is unreachable or busy; retry shortly"
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error_response(exc.status_code, code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return error_response(500, "internal_error", f"unexpected {type(exc).__name__}")

    def principal(request: Request) -> Principal:
        header = request.headers.get("authorization")
        if header:
            scheme, _, token = header.partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise AuthenticationFailed("use the header 'Authorization: Bearer <token>'")
            return service.authenticate(token.strip())
        if anonymous:
            return ANONYMOUS
        raise AuthenticationFailed(
            "authentication required: send 'Authorization: Bearer <token>' "
            "(create one with `quarkflow tokens create --user NAME`)"
        )

    Who = Annotated[Principal, Depends(principal)]
    ItemId = Annotated[int, FastApiPath(ge=1, le=2**31 - 1)]
    PredictionId = Annotated[
        str, FastApiPath(max_length=64, pattern="^[A-Za-z0-9-]+$", description="prediction id")
    ]

    ModelRef = Annotated[
        str,
        FastApiPath(max_length=64, pattern="^[A-Za-z0-9_.-]+$", description="3, v3 or an alias"),
    ]

    def request_id(request: Request) -> str | None:
        """X-Request-Id as the database can store it (checked before anything is accepted)."""
        rid = request.headers.get("x-request-id")
        if rid is not None and (len(rid) > 64 or not rid.isprintable()):
            raise InvalidInput(
                "header X-Request-Id: at most 64 printable characters", code="invalid_header"
            )
        return rid

    def need(who: Principal, *roles: Role, action: str) -> None:
        if not who.has(*roles):
            allowed = " or ".join(sorted(r.value for r in roles))
            raise PermissionDenied(f"{action} needs role {allowed}; {who.username} is {who.role}")

    def db_user(session: Any, who: Principal) -> User:
        if who.user_id is None:
            raise PermissionDenied("sign in: this action is not open to anonymous users")
        user = session.get(User, who.user_id)
        if user is None:
            raise AuthenticationFailed("the token's user no longer exists")
        return user

    def read_upload(upload: UploadFile) -> tuple[bytes, str | None]:
        data = upload.file.read(settings.max_upload_bytes + 1)
        return data, upload.content_type

    # ------------------------------------------------------------------ health + metrics

    @app.get("/healthz", tags=["ops"])
    def healthz() -> dict[str, str]:
        """The process is up (liveness)."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["ops"])
    def readyz() -> JSONResponse:
        """Ready to serve: model loaded, database and storage reachable (503 otherwise)."""
        report = service.readiness()
        return JSONResponse(report, status_code=200 if report["ready"] else 503)

    @app.get("/metrics", tags=["ops"])
    def metrics() -> Response:
        """Prometheus text format."""
        return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # ------------------------------------------------------------------ predictions

    @app.post(
        "/api/v1/predictions", response_model=PredictionOut, tags=["predictions"], responses=ERRORS
    )
    def predict(who: Who, request: Request, file: UploadFile = File(...)) -> dict:
        """Predict one image (multipart field `file`). Logged durably before the answer."""
        rid = request_id(request)
        return service.predict([read_upload(file)], principal=who, request_id=rid)[0]

    @app.post(
        "/api/v1/predictions/batch", response_model=BatchOut, tags=["predictions"], responses=ERRORS
    )
    def predict_batch(who: Who, request: Request, files: list[UploadFile] = File(...)) -> dict:
        """Predict several images (repeat the multipart field `files`). All or nothing."""
        rid = request.headers.get("x-request-id")
        uploads = [read_upload(f) for f in files]
        return {"predictions": service.predict(uploads, principal=who, request_id=rid)}

    @app.get("/api/v1/predictions/{prediction_id}", tags=["predictions"], responses=ERRORS)
    def get_prediction(prediction_id: PredictionId, who: Who) -> dict:
        """A prediction with its feedback and review state (`logged: false` while it is
        still in the outbox)."""
        return service.get_prediction(prediction_id)

    @app.post(
        "/api/v1/predictions/{prediction_id}/feedback",
        response_model=FeedbackOut,
        status_code=201,
        tags=["predictions"],
        responses=ERRORS,
    )
    def feedback(prediction_id: PredictionId, body: FeedbackIn, who: Who) -> dict:
        """Say the prediction was correct, or wrong (optionally with the true label).
        Acknowledged only once durable."""
        return service.feedback(
            prediction_id,
            verdict=body.verdict,
            true_label=body.true_label,
            comment=body.comment,
            principal=who,
        )

    @app.get("/api/v1/review-queue", tags=["review"], responses=ERRORS)
    def review_queue(
        who: Who,
        limit: int = Query(50, ge=1, le=500),
        offset: int = Query(0, ge=0, le=10_000),
        strategy: Literal["uncertainty", "diverse"] | None = Query(
            None, description="Order of the next items; default QF_REVIEW_STRATEGY."
        ),
    ) -> dict:
        """The work to do: open, sent and disputed items (answered ones have left). Disputed
        first, then by the current champion's uncertainty, spread for diversity and class
        balance under the `diverse` strategy."""
        from quarkflow_core.predictions import review_queue as queue

        need(who, Role.ANALYST, Role.ML_LEAD, action="reading the review queue")
        chosen = strategy or settings.review_strategy
        with service.session() as s:
            total, items = queue(session=s, limit=limit, offset=offset, strategy=chosen)
        return {"total": total, "strategy": chosen, "items": items}

    class ResolveIn(BaseModel):
        label: Text = Field(min_length=1, max_length=128)

    @app.post("/api/v1/review-queue/{item_id}/resolve", tags=["review"], responses=ERRORS)
    def resolve_review_item(item_id: ItemId, body: ResolveIn, who: Who) -> dict:
        """Settle an item (e.g. a disputed one) with a label (analyst or ml_lead)."""
        from quarkflow_core.review import project_classes, resolve_item

        with service.session() as s:
            begin_write(s)  # SQLite: read-then-write takes the write lock first
            item = resolve_item(
                session=s,
                item_id=item_id,
                label=body.label,
                user=db_user(s, who),
                classes=project_classes(session=s),
            )
            s.commit()
            return {"id": item.id, "state": item.state.value, "label": item.resolved_label}

    @app.post("/api/v1/review-queue/{item_id}/dismiss", tags=["review"], responses=ERRORS)
    def dismiss_review_item(item_id: ItemId, who: Who) -> dict:
        """Mark an item as label noise: left out of training (analyst or ml_lead)."""
        from quarkflow_core.review import dismiss_as_noise

        with service.session() as s:
            begin_write(s)  # SQLite: read-then-write takes the write lock first
            item = dismiss_as_noise(session=s, item_id=item_id, user=db_user(s, who))
            s.commit()
            return {"id": item.id, "state": item.state.value, "reason": item.reason.value}

    @app.get("/api/v1/images/{sha256}/prediction", tags=["predictions"], responses=ERRORS)
    def latest_image_prediction(
        who: Who, sha256: str = FastApiPath(pattern="^[0-9a-f]{64}$", description="sha256, hex")
    ) -> dict:
        """The newest logged prediction of an image, by its content hash (what
        `quarkflow batch-predict` and the review queue report), with feedback and review."""
        from quarkflow_core.predictions import latest_prediction, prediction_dict

        with service.session() as s:
            return prediction_dict(s, latest_prediction(session=s, image_sha256=sha256))

    @app.get("/api/v1/images/{sha256}", tags=["review"], responses=ERRORS)
    def get_image(
        sha256: Annotated[str, FastApiPath(max_length=64, pattern="^[0-9A-Fa-f]+$")],
        request: Request,
        expires: int | None = Query(None, ge=0, le=2**62),
        sig: str | None = Query(None, max_length=128),
    ) -> Response:
        """An image by content hash: with a signed link (what Label Studio's tasks carry) or
        a bearer token."""
        from quarkflow_core.images import CONTENT_TYPES, get_image_by_sha
        from quarkflow_core.review import check_image_signature

        if sig is not None and expires is not None:
            check_image_signature(settings.secret_key.get_secret_value(), sha256, expires, sig)
        else:
            principal(request)
        with service.session() as s:
            image = get_image_by_sha(session=s, sha256=sha256)
            if image is None:
                raise NotFound(f"no image with sha256 {sha256}")
            key = image.storage_key
        ext = key.rsplit(".", 1)[-1]
        return Response(
            service.storage.get(key),
            media_type=CONTENT_TYPES.get(ext, "application/octet-stream"),
            headers={"Cache-Control": "private, max-age=86400"},
        )

    @app.post("/api/v1/labelstudio/webhook", tags=["review"], responses=ERRORS)
    def labelstudio_webhook(payload: dict[str, Any], request: Request) -> dict:
        """Annotation events from Label Studio (shared-secret header). Records them, settles
        the items, and starts `retrain` if enough new labels have accumulated. The periodic
        labelstudio_sync flow is the fallback, so nothing depends on webhooks arriving."""
        import hmac as _hmac

        from quarkflow_core.labeling import parse_webhook
        from quarkflow_core.review import record_annotations, webhook_secret

        given = request.headers.get("x-quarkflow-webhook-secret", "")
        if not _hmac.compare_digest(given.encode(), webhook_secret(settings).encode()):
            raise AuthenticationFailed("missing or wrong X-Quarkflow-Webhook-Secret header")
        pulled = parse_webhook(payload)
        with service.session() as s:
            begin_write(s)  # SQLite: read-then-write takes the write lock first
            result = record_annotations(session=s, pulled=pulled)
            s.commit()
        result["retrain"] = maybe_trigger_retrain()
        return {"action": payload.get("action"), **result}

    def maybe_trigger_retrain() -> str | None:
        from quarkflow_core.labels import retrain_check
        from quarkflow_core.orchestration import trigger_deployment

        if not settings.prefect_api_url:
            return None
        with service.session() as s:
            due, _why, _counts = retrain_check(session=s, settings=settings)
        if not due:
            return None
        try:
            return trigger_deployment(settings.prefect_api_url)
        except QuarkflowError as exc:  # the annotation is recorded; the trigger flow retries
            log.warning("could not start retrain from the webhook: %s", exc.detail)
            return None

    # ------------------------------------------------------------------ registry

    def version_dict(s: Any, row: Any, tags: dict[int, list[str]]) -> dict:
        from quarkflow_core.registry import summary

        return {**summary(row, session=s), "aliases": tags.get(row.id, [])}

    def alias_tags(s: Any) -> dict[int, list[str]]:
        from quarkflow_core.registry import aliases

        tags: dict[int, list[str]] = {}
        for alias, row in aliases(session=s).items():
            tags.setdefault(row.id, []).append(alias)
        return tags

    @app.get("/api/v1/models", tags=["models"], responses=ERRORS)
    def list_models(who: Who) -> dict:
        """Every registered version with its aliases and headline metrics."""
        from quarkflow_core.registry import list_versions

        with service.session() as s:
            tags = alias_tags(s)
            return {"versions": [version_dict(s, r, tags) for r in list_versions(session=s)]}

    @app.get("/api/v1/models/aliases", tags=["models"], responses=ERRORS)
    def get_aliases(who: Who) -> dict:
        """champion / challenger -> version, and what this server is serving right now."""
        from quarkflow_core.registry import aliases

        with service.session() as s:
            named = {a: r.version for a, r in aliases(session=s).items()}
        current = service.holder.current
        return {"aliases": named, "serving": current.describe() if current else None}

    @app.get("/api/v1/models/history", tags=["models"], responses=ERRORS)
    def model_history(who: Who) -> dict:
        """Every promotion event: who, when, from, to, why, evidence hash."""
        from quarkflow_core.registry import event_dict, history

        with service.session() as s:
            return {"events": [event_dict(session=s, event=e) for e in history(session=s)]}

    @app.get("/api/v1/models/{ref}", tags=["models"], responses=ERRORS)
    def get_model(ref: ModelRef, who: Who) -> dict:
        """One version (3, v3, champion, challenger) with its lineage."""
        from quarkflow_core.registry import get_version, lineage

        with service.session() as s:
            row = get_version(session=s, ref=ref)
            return {**version_dict(s, row, alias_tags(s)), "lineage": lineage(session=s, row=row)}

    @app.get("/api/v1/models/{ref}/proposal", tags=["models"], responses=ERRORS)
    def proposal(ref: ModelRef, who: Who) -> dict:
        """The policy's verdict on making this version champion, with the evidence."""
        from quarkflow_core.registry import PolicyConfig, propose

        need(who, Role.ANALYST, Role.ML_LEAD, action="reading promotion evidence")
        with service.session() as s:
            p = propose(
                session=s,
                storage=service.storage,
                ref=ref,
                cache_root=service.cache_root,
                config=PolicyConfig.from_settings(settings),
            )
            return {"evidence_sha256": p.evidence_sha256, **p.evidence}

    def decided(s: Any, event: Any) -> dict:
        from quarkflow_core.registry import event_dict

        return event_dict(session=s, event=event)

    @app.post("/api/v1/models/{ref}/approve", tags=["models"], responses=ERRORS)
    def approve(ref: ModelRef, body: DecisionIn, who: Who) -> dict:
        """Make this version champion (role ml_lead). Serving switches within seconds."""
        from quarkflow_core.registry import PolicyConfig
        from quarkflow_core.registry import approve as do_approve

        with service.session() as s:
            event = do_approve(
                session=s,
                storage=service.storage,
                version=ref,
                user=db_user(s, who),
                reason=body.reason,
                cache_root=service.cache_root,
                override=body.override,
                config=PolicyConfig.from_settings(settings),
            )
            return decided(s, event)

    @app.post("/api/v1/models/{ref}/reject", tags=["models"], responses=ERRORS)
    def reject(ref: ModelRef, body: DecisionIn, who: Who) -> dict:
        """Decline a candidate (role ml_lead)."""
        from quarkflow_core.registry import reject as do_reject

        with service.session() as s:
            event = do_reject(session=s, version=ref, user=db_user(s, who), reason=body.reason)
            return decided(s, event)

    @app.post("/api/v1/models/rollback", tags=["models"], responses=ERRORS)
    def rollback(body: RollbackIn, who: Who) -> dict:
        """Move the champion back (role ml_lead)."""
        from quarkflow_core.registry import rollback as do_rollback

        with service.session() as s:
            event = do_rollback(
                session=s,
                storage=service.storage,
                user=db_user(s, who),
                reason=body.reason,
                to=body.to,
            )
            return decided(s, event)

    # ------------------------------------------------------------------ orchestration

    class RetrainIn(BaseModel):
        epochs: int = Field(15, ge=1, le=500)
        architecture: str = Field("smallcnn", max_length=64)
        kfold: int = Field(0, ge=0, le=20)
        prune_ratio: float | None = Field(None, gt=0.0, lt=1.0)

    @app.post("/api/v1/retrain", status_code=202, tags=["models"], responses=ERRORS)
    def start_retrain(body: RetrainIn, who: Who) -> dict:
        """Start the `retrain` deployment on the Prefect worker (role ml_lead)."""
        from quarkflow_core.orchestration import trigger_deployment

        need(who, Role.ML_LEAD, action="starting a retrain")
        run_id = trigger_deployment(settings.prefect_api_url, parameters=body.model_dump())
        return {"flow_run_id": run_id, "deployment": "retrain/retrain"}

    # ------------------------------------------------------------------ users

    @app.post("/api/v1/users", status_code=201, tags=["users"], responses=ERRORS)
    def create_user(body: UserIn, who: Who) -> dict:
        """Create a user (role admin)."""
        from quarkflow_core.users import create_user as do_create
        from quarkflow_core.users import record_audit, require_role

        with service.session() as s:
            begin_write(s)  # SQLite: read-then-write takes the write lock first
            actor = db_user(s, who)
            require_role(session=s, user=actor, allowed={Role.ADMIN}, action="users.create")
            user = do_create(
                session=s, username=body.username, role=body.role, password=body.password
            )
            record_audit(
                session=s,
                actor=actor,
                action="users.create",
                outcome="ok",
                target_type="user",
                target_id=user.username,
                detail={"role": user.role.value},
            )
            s.commit()
            return {"username": user.username, "role": user.role.value}

    @app.get("/api/v1/whoami", tags=["users"], responses=ERRORS)
    def whoami(who: Who) -> dict:
        return {"username": who.username, "role": who.role.value, "anonymous": who.user_id is None}

    if with_demo:
        from app.demo import mount_demo

        app = mount_demo(app, service, settings, anonymous=anonymous)
    return app

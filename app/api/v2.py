"""The Open Inference Protocol's REST paths (KServe v2, what tritonclient's HTTP client and
Triton, KServe, MLServer speak) under ``/v2``, next to ``/api/v1``: health, server and model
metadata, model readiness and inference, on the same service (``quarkflow_core.oip``).

Health and server metadata are open, like ``/healthz``; the model routes take the same
bearer token as ``/api/v1`` and the same permission as predicting. The binary tensor
extension is accepted and answered (``Inference-Header-Content-Length``: a JSON header, then
the tensors' raw bytes), as tritonclient sends and reads it by default. Errors leave as the
protocol's ``{"error": sentence}``, with Quarkflow's ``code`` beside it; an input the
protocol cannot take (a corrupt image, a wrong shape) is 400, as the protocol says."""

from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from sqlalchemy.exc import OperationalError
from starlette.concurrency import run_in_threadpool

from app.api.deps import AppSettings, Service, Who
from app.api.errors import STATUS
from quarkflow_core.errors import InvalidInput, QuarkflowError
from quarkflow_core.oip import protocol

HEADER_LENGTH = "Inference-Header-Content-Length"
SOURCE = "oip-rest"  # the logged images' source


def oip_status(code: str) -> int:
    """The HTTP status of a core error code under the protocol: the API's (``STATUS``), but
    400 for every input it rejects (the API's 415/422)."""
    status = STATUS.get(code, 400)
    return 400 if status in (415, 422) else status


def oip_error(status: int, detail: str, code: str) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse({"error": detail, "code": code}, status_code=status, headers=headers)


class OipRoute(APIRoute):
    """A route whose errors (its dependencies' too) take the protocol's shape."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except QuarkflowError as exc:
                return oip_error(oip_status(exc.code), exc.detail, exc.code)
            except RequestValidationError as exc:
                return oip_error(400, str(exc.errors()[:3]), "invalid_request")
            except OperationalError:
                detail = "the database is unreachable or busy; retry shortly"
                return oip_error(503, detail, "database_unavailable")

        return route


router = APIRouter(prefix="/v2", tags=["open inference protocol (v2)"], route_class=OipRoute)


@router.get("")
def server_metadata() -> dict:
    """The server's name, version and protocol extensions."""
    return protocol.server_metadata()


@router.get("/health/live")
def server_live() -> dict:
    """Live: the process answers."""
    return {"live": True}


@router.get("/health/ready")
def server_ready(service: Service) -> JSONResponse:
    """Ready as `/readyz` is (a model served, database and storage reachable); 503 if not."""
    ready = bool(service.readiness()["ready"])
    return JSONResponse({"ready": ready}, status_code=200 if ready else 503)


def _metadata(service: Service, model_name: str, model_version: str = "") -> dict:
    return protocol.model_metadata(service, protocol.find_model(service, model_name, model_version))


def _ready(service: Service, model_name: str, model_version: str = "") -> JSONResponse:
    model = protocol.find_model(service, model_name, model_version)
    ready = model.predictor is not None
    return JSONResponse({"name": model.name, "ready": ready}, status_code=200 if ready else 503)


@router.get("/models/{model_name}")
def model_metadata(model_name: str, who: Who, service: Service) -> dict:
    """A model (a project) served now: version, platform, inputs, outputs, classes."""
    return _metadata(service, model_name)


@router.get("/models/{model_name}/versions/{model_version}")
def model_version_metadata(model_name: str, model_version: str, who: Who, service: Service) -> dict:
    """As `GET /v2/models/{model_name}`, for the version served (any other: 404)."""
    return _metadata(service, model_name, model_version)


@router.get("/models/{model_name}/ready")
def model_ready(model_name: str, who: Who, service: Service) -> JSONResponse:
    """200 while the model serves a version, 503 while it has none."""
    return _ready(service, model_name)


@router.get("/models/{model_name}/versions/{model_version}/ready")
def model_version_ready(
    model_name: str, model_version: str, who: Who, service: Service
) -> JSONResponse:
    """As `GET /v2/models/{model_name}/ready`, for the version served (any other: 404)."""
    return _ready(service, model_name, model_version)


async def _body(request: Request, limit: int) -> bytes:
    """The request body, refused (413) past ``limit`` bytes before or while it is read."""
    too_large = InvalidInput(
        f"the request body exceeds {limit:,} bytes, the limit of this route "
        "(QF_MAX_BATCH_FILES images of QF_MAX_UPLOAD_BYTES, plus QF_MAX_JSON_BYTES)",
        code="too_large",
    )
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise too_large
    if request.headers.get("content-encoding", "identity").lower() != "identity":
        raise InvalidInput("compressed request bodies are not accepted: send them uncompressed")
    chunks, seen = [], 0
    async for chunk in request.stream():
        seen += len(chunk)
        if seen > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


async def _infer(
    request: Request, who: Any, service: Any, settings: Any, model_name: str, version: str
) -> Response:
    limit = settings.max_batch_files * (settings.max_upload_bytes + 4) + settings.max_json_bytes
    body = await _body(request, limit)
    header = request.headers.get(HEADER_LENGTH)
    if header is not None and not header.isdigit():
        raise InvalidInput(f"{HEADER_LENGTH}: a number of bytes")
    infer_request = protocol.request_from_json(
        body,
        header_length=None if header is None else int(header),
        model_name=model_name,
        model_version=version,
    )
    answer = await run_in_threadpool(
        protocol.infer, service, infer_request, principal=who, source=SOURCE
    )
    head, binary = protocol.response_to_json(answer)
    if not binary:
        return Response(head, media_type="application/json")
    headers = {HEADER_LENGTH: str(len(head))}
    return Response(head + binary, media_type="application/octet-stream", headers=headers)


INFER_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {"type": "object"}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}


@router.post("/models/{model_name}/infer", openapi_extra=INFER_BODY)
async def infer(
    model_name: str, request: Request, who: Who, service: Service, settings: AppSettings
) -> Response:
    """Predict: input `image` (BYTES [N], image files) or `tensor` (UINT8 [N, C, H, W] at the
    model's preset size); outputs `label`, `confidence`, `probabilities` (or `detections`),
    `review`, `prediction_id`. Each image is logged as `POST /api/v1/predictions` logs it."""
    return await _infer(request, who, service, settings, model_name, "")


@router.post("/models/{model_name}/versions/{model_version}/infer", openapi_extra=INFER_BODY)
async def infer_version(
    model_name: str,
    model_version: str,
    request: Request,
    who: Who,
    service: Service,
    settings: AppSettings,
) -> Response:
    """As `POST /v2/models/{model_name}/infer`, for the version served (any other: 404)."""
    return await _infer(request, who, service, settings, model_name, model_version)

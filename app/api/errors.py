"""Error codes to HTTP statuses, the JSON error body, and the app's exception handlers."""

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

from quarkflow_core.errors import QuarkflowError

log = logging.getLogger("quarkflow.api")

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


async def core_error(_request: Request, exc: QuarkflowError) -> JSONResponse:
    return error_response(STATUS.get(exc.code, 400), exc.code, exc.detail)


async def validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
    parts = []
    for err in exc.errors()[:5]:
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        parts.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
    return error_response(422, "invalid_request", "; ".join(parts) or "invalid request")


async def database_down(_request: Request, exc: OperationalError) -> JSONResponse:
    log.warning("database unavailable: %s", str(exc).splitlines()[0][:200])
    return error_response(
        503, "database_unavailable", "the database is unreachable or busy; retry shortly"
    )


async def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return error_response(exc.status_code, code, str(exc.detail))


async def unexpected(_request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error")
    return error_response(500, "internal_error", f"unexpected {type(exc).__name__}")


def add_error_handlers(app: FastAPI) -> None:
    """Every error leaves as ``{"error": code, "detail": sentence}``."""
    app.add_exception_handler(QuarkflowError, core_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(OperationalError, database_down)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, unexpected)

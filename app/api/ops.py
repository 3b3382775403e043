"""Liveness, readiness and Prometheus metrics (open, outside /api)."""

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app.api.deps import Service

router = APIRouter()


@router.get("/healthz", tags=["ops"])
def healthz() -> dict[str, str]:
    """The process is up (liveness)."""
    return {"status": "ok"}


@router.get("/readyz", tags=["ops"])
def readyz(service: Service) -> JSONResponse:
    """Ready to serve: model loaded, database and storage reachable (503 otherwise)."""
    report = service.readiness()
    return JSONResponse(report, status_code=200 if report["ready"] else 503)


@router.get("/metrics", tags=["ops"])
def metrics(service: Service) -> Response:
    """Prometheus text format."""
    return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)

"""``create_app``: the service, the lifespan, middleware, error handlers, the routers and the
Gradio demo, wired together. Routes live in one module per resource.

The project-scoped routers are mounted twice, with the same routes: at ``/api/v1`` (the
default project, the paths from before projects) and at ``/api/v1/projects/{project}``;
``deps.CurrentProject`` tells a route which project it works in. The Open Inference
Protocol's REST paths (``v2``, under ``/v2``) are one more router; its gRPC side
(``oip_grpc``) starts and stops with the lifespan, on ``QF_GRPC_PORT`` (0: off)."""

from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI

from app.api import (
    feedback,
    images,
    models,
    ops,
    predictions,
    projects,
    review,
    users,
    v2,
    webhooks,
)
from app.api.deps import project_path
from app.api.errors import add_error_handlers
from app.api.middleware import BodyLimits, EdgeMiddleware
from quarkflow_core import __version__
from quarkflow_core.config import Settings, get_settings
from quarkflow_core.service import PredictionService

LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}

# in this order: it is the order of the OpenAPI paths, and of matching. The project-scoped
# ones: under API_PREFIX (the default project), then again under PROJECT_PREFIX after the rest.
ROUTERS = (ops, predictions, feedback, review, images, webhooks, models, users, projects, v2)
PROJECT_SCOPED = (predictions, feedback, review, images, webhooks, models)
API_PREFIX = "/api/v1"
PROJECT_PREFIX = "/api/v1/projects/{project}"


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
        grpc_server = None
        try:
            if settings.grpc_port:  # the Open Inference Protocol's gRPC side (app/api/oip_grpc.py)
                from app.api.oip_grpc import start_grpc

                grpc_server = start_grpc(
                    service,
                    settings,
                    # app.main's workers are not told uvicorn's address: every address
                    host=host or "0.0.0.0",  # noqa: S104
                    anonymous=anonymous,
                    reuse_port=host is None,  # its workers share the port
                )
            yield
        finally:
            if grpc_server is not None:
                from app.api.oip_grpc import stop_grpc

                stop_grpc(grpc_server)
            service.stop()

    app = FastAPI(
        title="Quarkflow API",
        version=__version__,
        description="Predictions with durable logging and feedback, the review queue, and the "
        "model registry (promotion needs role ml_lead). Authenticate with "
        "`Authorization: Bearer <token>` (`quarkflow tokens create`).",
        lifespan=lifespan,
    )
    # what app.api.deps hands to the routes
    app.state.service = service
    app.state.settings = settings
    app.state.anonymous = anonymous
    limits = BodyLimits(
        app.router.routes,
        json_bytes=settings.max_json_bytes,
        per_file=settings.max_upload_bytes,
        max_files=settings.max_batch_files,
    )
    app.add_middleware(EdgeMiddleware, service=service, limits=limits)
    add_error_handlers(app)
    for module in ROUTERS:
        app.include_router(module.router, prefix=API_PREFIX if module in PROJECT_SCOPED else "")
    for module in PROJECT_SCOPED:
        app.include_router(
            module.router, prefix=PROJECT_PREFIX, dependencies=[Depends(project_path)]
        )

    if with_demo:
        from app.demo import mount_demo  # Gradio: seconds to import, only when mounted

        app = mount_demo(app, service, settings, anonymous=anonymous)
    return app

"""The one ASGI app: REST API (OpenAPI at /docs), Gradio demo at /demo, health and metrics.

Thin: every route authenticates, calls ``quarkflow_core`` and shapes JSON. Errors are
``{"error": <code>, "detail": <sentence>}`` with a 4xx/5xx status.

- ``app``: :func:`create_app`, which only wires (state, middleware, error handlers, routers,
  the Gradio demo);
- ``deps``: what routes depend on: the service and settings, who is calling, role checks, a
  database session;
- ``schemas``: request and response bodies, path parameter types, the documented errors;
- ``errors``: error codes to statuses, the JSON error body and the exception handlers;
- ``middleware``: body limits, the last-resort 500 and request metrics;
- one router per resource: ``ops``, ``predictions``, ``feedback``, ``review``, ``images``,
  ``webhooks``, ``models``, ``users``, ``projects``. The project-scoped ones (predictions to
  models) are mounted at ``/api/v1`` (the default project) and again at
  ``/api/v1/projects/{project}``; ``deps.CurrentProject`` is the project a route works in."""

from app.api.app import LOCAL_HOSTS, create_app
from app.api.errors import STATUS, error_response
from app.api.middleware import BodyLimits, EdgeMiddleware

__all__ = [
    "LOCAL_HOSTS",
    "STATUS",
    "BodyLimits",
    "EdgeMiddleware",
    "create_app",
    "error_response",
]

"""Label Studio's annotation webhook (shared-secret header). Project-scoped: at `/api/v1` the
Label Studio project the event names picks the Quarkflow project; at
`/api/v1/projects/{project}` the path does."""

import hmac
import logging
from typing import Any

from fastapi import APIRouter, Request

from app.api.deps import (
    AppSettings,
    CurrentProject,
    DbSession,
    ProjectRef,
    Service,
)
from app.api.schemas import ERRORS
from quarkflow_core.config import Settings
from quarkflow_core.database import begin_write
from quarkflow_core.errors import AuthenticationFailed, InvalidInput, NotFound, QuarkflowError
from quarkflow_core.labels import retrain_check
from quarkflow_core.labelstudio import parse_webhook, webhook_project
from quarkflow_core.orchestration import trigger_deployment
from quarkflow_core.projects import get_project
from quarkflow_core.review import project_for_labelstudio, record_annotations, webhook_secret
from quarkflow_core.service import PredictionService

log = logging.getLogger("quarkflow.api")

router = APIRouter()


@router.post("/labelstudio/webhook", tags=["review"], responses=ERRORS)
def labelstudio_webhook(
    payload: dict[str, Any],
    request: Request,
    project: CurrentProject,
    service: Service,
    settings: AppSettings,
    s: DbSession,
) -> dict:
    """Annotation events from Label Studio (shared-secret header). Records them, settles
    the items, and starts `retrain` if enough new labels have accumulated. The periodic
    labelstudio_sync flow is the fallback, so nothing depends on webhooks arriving."""
    given = request.headers.get("x-quarkflow-webhook-secret", "")
    if not hmac.compare_digest(given.encode(), webhook_secret(settings).encode()):
        raise AuthenticationFailed("missing or wrong X-Quarkflow-Webhook-Secret header")
    pulled = parse_webhook(payload)
    ls_id, title = webhook_project(payload)
    if "project" not in request.path_params:  # the event's Label Studio project decides
        found = project_for_labelstudio(s, ls_id, title=title, settings=settings)
        project = ProjectRef(found, get_project(session=s, ref=found).name)
    elif ls_id is not None or title:  # the path decides, and must agree with the event
        try:
            found = project_for_labelstudio(s, ls_id, title=title, settings=settings)
        except NotFound:  # a Label Studio project none of ours recorded: the path decides
            found = project.id
        if found != project.id:
            raise InvalidInput(
                f"this event is from Label Studio project {ls_id}, which belongs to project "
                f"{get_project(session=s, ref=found).name!r}, not {project.name!r}: point the "
                "webhook at that project's path",
                code="wrong_project",
            )
    begin_write(s)  # SQLite: read-then-write takes the write lock first
    result = record_annotations(session=s, pulled=pulled, project_id=project.id)
    s.commit()  # the edge's one commit, before the trigger: the retrain reads these labels
    result["retrain"] = maybe_trigger_retrain(service, settings, project)
    return {"action": payload.get("action"), **result}


def maybe_trigger_retrain(
    service: PredictionService, settings: Settings, project: ProjectRef
) -> str | None:
    """Start the project's retrain deployment if enough new labels have accumulated (its flow
    run id); None without Prefect, when not due, or when Prefect refused (the trigger flow
    retries)."""
    if not settings.prefect_api_url:
        return None
    with service.session() as s:
        due, _why, _counts = retrain_check(session=s, settings=settings, project_id=project.id)
    if not due:
        return None
    try:
        return trigger_deployment(settings.prefect_api_url, parameters={"project": project.name})
    except QuarkflowError as exc:  # the annotation is recorded; the trigger flow retries
        log.warning("could not start retrain from the webhook: %s", exc.detail)
        return None

"""Label Studio's annotation webhook (shared-secret header)."""

import hmac
import logging
from typing import Any

from fastapi import APIRouter, Request

from app.api.deps import AppSettings, DbSession, Service
from app.api.schemas import ERRORS
from quarkflow_core.config import Settings
from quarkflow_core.database import begin_write
from quarkflow_core.errors import AuthenticationFailed, QuarkflowError
from quarkflow_core.labels import retrain_check
from quarkflow_core.labelstudio import parse_webhook
from quarkflow_core.orchestration import trigger_deployment
from quarkflow_core.review import record_annotations, webhook_secret
from quarkflow_core.service import PredictionService

log = logging.getLogger("quarkflow.api")

router = APIRouter()


@router.post("/api/v1/labelstudio/webhook", tags=["review"], responses=ERRORS)
def labelstudio_webhook(
    payload: dict[str, Any],
    request: Request,
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
    begin_write(s)  # SQLite: read-then-write takes the write lock first
    result = record_annotations(session=s, pulled=pulled)
    s.commit()  # the edge's one commit, before the trigger: the retrain reads these labels
    result["retrain"] = maybe_trigger_retrain(service, settings)
    return {"action": payload.get("action"), **result}


def maybe_trigger_retrain(service: PredictionService, settings: Settings) -> str | None:
    """Start the retrain deployment if enough new labels have accumulated (its flow run id);
    None without Prefect, when not due, or when Prefect refused (the trigger flow retries)."""
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

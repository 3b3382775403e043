"""The deployments `quarkflow worker` serves. The cron schedule of `retrain` exists but is off
unless QF_RETRAIN_SCHEDULE_ENABLED=true; `label_trigger` checks every QF_LABEL_TRIGGER_S. The
two periodic flows run over every project (parameter ``project="*"``)."""

from __future__ import annotations

from typing import Any

from quarkflow_core.config import Settings


def deployments(settings: Settings) -> list[Any]:
    from flows.batch_predict import batch_predict
    from flows.common import EVERY_PROJECT
    from flows.labelstudio_sync import labelstudio_sync
    from flows.promote import promote
    from flows.retrain import retrain
    from flows.triggers import label_trigger

    return [
        retrain.to_deployment(
            name="retrain",
            cron=settings.retrain_cron,
            paused=not settings.retrain_schedule_enabled,
            description="Retrain on seed + feedback + annotations; registers a challenger.",
        ),
        batch_predict.to_deployment(name="batch_predict"),
        promote.to_deployment(name="promote"),
        labelstudio_sync.to_deployment(
            name="labelstudio_sync",
            interval=settings.labelstudio_sync_s,
            paused=settings.labelstudio_token is None,
            parameters={"project": EVERY_PROJECT},
        ),
        label_trigger.to_deployment(
            name="label_trigger",
            interval=settings.label_trigger_s,
            paused=settings.retrain_min_new_labels <= 0,
            parameters={"project": EVERY_PROJECT},
        ),
    ]

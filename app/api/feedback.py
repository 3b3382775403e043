"""Feedback on a prediction: correct, or wrong (optionally with the true label; a detection's
per-box verdicts and missed boxes). Project-scoped."""

from fastapi import APIRouter

from app.api.deps import CurrentProject, Service, Who
from app.api.schemas import ERRORS, FeedbackIn, FeedbackOut, PredictionId

router = APIRouter()


@router.post(
    "/predictions/{prediction_id}/feedback",
    response_model=FeedbackOut,
    status_code=201,
    tags=["predictions"],
    responses=ERRORS,
)
def feedback(
    prediction_id: PredictionId,
    body: FeedbackIn,
    who: Who,
    project: CurrentProject,
    service: Service,
) -> dict:
    """Say the prediction was correct, or wrong (optionally with the true label; for a
    detection, a verdict per box and the boxes of missed objects). Acknowledged only once
    durable."""
    return service.feedback(
        prediction_id,
        verdict=body.verdict,
        true_label=body.true_label,
        comment=body.comment,
        principal=who,
        project_id=project.id,
        boxes=None if body.boxes is None else [b.model_dump(exclude_none=True) for b in body.boxes],
        missed=None if body.missed is None else [m.model_dump() for m in body.missed],
    )

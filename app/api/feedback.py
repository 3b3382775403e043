"""Feedback on a prediction: correct, or wrong (optionally with the true label). Project-scoped."""

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
    """Say the prediction was correct, or wrong (optionally with the true label).
    Acknowledged only once durable."""
    return service.feedback(
        prediction_id,
        verdict=body.verdict,
        true_label=body.true_label,
        comment=body.comment,
        principal=who,
        project_id=project.id,
    )

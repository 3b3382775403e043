"""Predictions: one image, a batch, and reading one back. Project-scoped: mounted at `/api/v1`
(the default project) and at `/api/v1/projects/{project}`."""

from fastapi import APIRouter, File, Request, UploadFile

from app.api.deps import AppSettings, CurrentProject, Service, Who, request_id
from app.api.schemas import ERRORS, BatchOut, PredictionId, PredictionOut

router = APIRouter()


async def read_upload(upload: UploadFile, limit: int) -> tuple[bytes, str | None]:
    """The upload's first ``limit + 1`` bytes (one past, so the service can tell it is too
    large) and its declared content type. The multipart body was parsed once, by the route's
    ``File`` parameter; an upload spooled to disk is read in a worker thread."""
    data = await upload.read(limit + 1)
    return data, upload.content_type


@router.post("/predictions", response_model=PredictionOut, tags=["predictions"], responses=ERRORS)
async def predict(
    who: Who,
    project: CurrentProject,
    request: Request,
    service: Service,
    settings: AppSettings,
    file: UploadFile = File(...),
) -> dict:
    """Predict one image (multipart field `file`). Logged durably before the answer."""
    rid = request_id(request)
    uploads = [await read_upload(file, settings.max_upload_bytes)]
    out = await service.predict_async(uploads, principal=who, request_id=rid, project_id=project.id)
    return out[0]


@router.post("/predictions/batch", response_model=BatchOut, tags=["predictions"], responses=ERRORS)
async def predict_batch(
    who: Who,
    project: CurrentProject,
    request: Request,
    service: Service,
    settings: AppSettings,
    files: list[UploadFile] = File(...),
) -> dict:
    """Predict several images (repeat the multipart field `files`). All or nothing."""
    rid = request.headers.get("x-request-id")
    uploads = [await read_upload(f, settings.max_upload_bytes) for f in files]
    return {
        "predictions": await service.predict_async(
            uploads, principal=who, request_id=rid, project_id=project.id
        )
    }


@router.get("/predictions/{prediction_id}", tags=["predictions"], responses=ERRORS)
def get_prediction(
    prediction_id: PredictionId, who: Who, project: CurrentProject, service: Service
) -> dict:
    """A prediction with its feedback and review state (`logged: false` while it is
    still in the outbox)."""
    return service.get_prediction(prediction_id, project_id=project.id)

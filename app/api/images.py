"""Images by content hash: the bytes (signed link or token) and their newest prediction.
Project-scoped: a content hash names an image within a project."""

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response
from sqlalchemy import select

from app.api.deps import AppSettings, CurrentProject, DbSession, Service, Who, principal
from app.api.schemas import ERRORS, ImageKey, ImageSha256
from quarkflow_core.errors import NotFound
from quarkflow_core.images import CONTENT_TYPES, get_image_by_sha
from quarkflow_core.predictions import latest_prediction, prediction_dict
from quarkflow_core.review import check_image_signature
from quarkflow_core.schema import Image

router = APIRouter()


@router.get("/images/{sha256}/prediction", tags=["predictions"], responses=ERRORS)
def latest_image_prediction(
    who: Who, project: CurrentProject, s: DbSession, sha256: ImageSha256
) -> dict:
    """The newest logged prediction of an image, by its content hash (what
    `quarkflow batch-predict` and the review queue report), with feedback and review."""
    pred = latest_prediction(session=s, image_sha256=sha256, project_id=project.id)
    return prediction_dict(s, pred)


@router.get("/images/{sha256}", tags=["review"], responses=ERRORS)
def get_image(
    sha256: ImageKey,
    request: Request,
    project: CurrentProject,
    service: Service,
    settings: AppSettings,
    s: DbSession,
    expires: int | None = Query(None, ge=0, le=2**62),
    sig: str | None = Query(None, max_length=128),
) -> Response:
    """An image by content hash: with a signed link (what Label Studio's tasks carry) or
    a bearer token."""
    signed = sig is not None and expires is not None
    if signed:
        check_image_signature(settings.secret_key.get_secret_value(), sha256, expires, sig)
    else:
        principal(request)
    image = get_image_by_sha(session=s, sha256=sha256, project_id=project.id)
    if image is None and signed:
        # a signed link names bytes, not a project (`review.signed_image_url` issues
        # /api/v1/images/... for every project's image); the stored bytes are shared
        image = s.scalar(select(Image).where(Image.sha256 == sha256).limit(1))
    if image is None:
        raise NotFound(f"no image with sha256 {sha256}")
    key = image.storage_key
    s.close()  # the database connection goes back before the storage read
    ext = key.rsplit(".", 1)[-1]
    return Response(
        service.storage.get(key),
        media_type=CONTENT_TYPES.get(ext, "application/octet-stream"),
        headers={"Cache-Control": "private, max-age=86400"},
    )

"""Request and response bodies, path parameter types, and the documented error responses."""

from typing import Annotated, Any

from fastapi import Path
from pydantic import AfterValidator, BaseModel, Field

# --------------------------------------------------------------------------- text and paths


def _storable(value: str | None) -> str | None:
    """Refuse at the edge what the database would refuse after the request was acknowledged:
    NUL and other control characters (tabs and newlines are fine)."""
    if value is not None and any(ord(c) < 32 and c not in "\t\n\r" for c in value):
        raise ValueError("must not contain NUL or other control characters")
    return value


Text = Annotated[str, AfterValidator(_storable)]

ItemId = Annotated[int, Path(ge=1, le=2**31 - 1)]
PredictionId = Annotated[
    str, Path(max_length=64, pattern="^[A-Za-z0-9-]+$", description="prediction id")
]
ModelRef = Annotated[
    str,
    Path(max_length=64, pattern="^[A-Za-z0-9_.-]+$", description="3, v3 or an alias"),
]
ImageSha256 = Annotated[str, Path(pattern="^[0-9a-f]{64}$", description="sha256, hex")]
ImageKey = Annotated[str, Path(max_length=64, pattern="^[0-9A-Fa-f]+$")]

# --------------------------------------------------------------------------- predictions


class TopK(BaseModel):
    label: str
    confidence: float


class PredictionOut(BaseModel):
    id: str = Field(description="Prediction id (use it for feedback).")
    label: str
    confidence: float = Field(description="Calibrated probability of the label.")
    topk: list[TopK]
    model_version: int | None
    latency_ms: float = Field(description="Server-side time for this image.")
    review: bool = Field(description="True when it went to the review queue.")
    image_sha256: str


class BatchOut(BaseModel):
    predictions: list[PredictionOut]


# --------------------------------------------------------------------------- feedback


class FeedbackIn(BaseModel):
    verdict: str = Field(description="correct | wrong", examples=["wrong"])
    true_label: Text | None = Field(None, max_length=128, examples=["7"])
    comment: Text | None = Field(None, max_length=2000)


class FeedbackOut(BaseModel):
    id: str
    prediction_id: str
    verdict: str
    true_label: str | None
    durable: bool


# --------------------------------------------------------------------------- review


class ResolveIn(BaseModel):
    label: Text = Field(min_length=1, max_length=128)


# --------------------------------------------------------------------------- models


class DecisionIn(BaseModel):
    reason: Text = Field(min_length=1, max_length=4000)
    override: bool = False


class RollbackIn(BaseModel):
    reason: Text = Field(min_length=1, max_length=4000)
    to: Text | None = Field(None, description="Version (3, v3); default: previous champion.")


class RetrainIn(BaseModel):
    epochs: int = Field(15, ge=1, le=500)
    architecture: str = Field("smallcnn", max_length=64)
    kfold: int = Field(0, ge=0, le=20)
    prune_ratio: float | None = Field(None, gt=0.0, lt=1.0)


# --------------------------------------------------------------------------- users


class UserIn(BaseModel):
    username: Text = Field(min_length=2, max_length=64)
    role: str
    password: Text | None = Field(None, min_length=8, max_length=256)


# --------------------------------------------------------------------------- projects

Username = Annotated[
    str, Path(max_length=64, pattern="^[A-Za-z0-9._@-]+$", description="user name")
]


class ProjectIn(BaseModel):
    name: str = Field(
        min_length=1, max_length=30, pattern="^[a-z0-9][a-z0-9-]*$", examples=["birds"]
    )
    classes: list[Text] = Field(min_length=2, max_length=1000, examples=[["robin", "wren"]])
    task_type: str = Field("classification", max_length=32)
    title: Text | None = Field(None, max_length=128)


class GrantIn(BaseModel):
    role: str = Field(description="domain_expert | analyst | ml_lead | admin", examples=["ml_lead"])


# --------------------------------------------------------------------------- errors


class ErrorOut(BaseModel):
    error: str
    detail: str


ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorOut} for code in (401, 403, 404, 409, 413, 415, 422, 503)
}

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


class BoxOut(BaseModel):
    label: str
    score: float = Field(description="The detector's score for this box, 0..1.")
    box: list[float] = Field(description="[x1, y1, x2, y2] in pixels of the uploaded image.")
    shown: bool = Field(description="Score at or over the model's threshold (what people see).")


class PredictionOut(BaseModel):
    id: str = Field(description="Prediction id (use it for feedback).")
    label: str = Field(description="The class; for a detection, the top shown box's label.")
    confidence: float = Field(
        description="Calibrated probability of the label (detection: the top box's score)."
    )
    topk: list[TopK]
    model_version: int | None
    latency_ms: float = Field(description="Server-side time for this image.")
    review: bool = Field(description="True when it went to the review queue.")
    image_sha256: str
    boxes: list[BoxOut] | None = Field(
        None, description="Detection projects: the boxes found (shown ones first by score)."
    )
    width: int | None = Field(None, description="Detection: the image's width in pixels.")
    height: int | None = Field(None, description="Detection: the image's height in pixels.")
    threshold: float | None = Field(None, description="Detection: the model's score threshold.")


class BatchOut(BaseModel):
    predictions: list[PredictionOut]


# --------------------------------------------------------------------------- feedback


class BoxVerdictIn(BaseModel):
    index: int = Field(description="The box's index in the prediction's boxes.")
    verdict: str = Field(description="correct | wrong_label | bad_box | not_object")
    label: Text | None = Field(None, max_length=128, description="wrong_label: the right label")
    box: list[float] | None = Field(None, description="bad_box: the corrected [x1, y1, x2, y2]")


class MissedBoxIn(BaseModel):
    label: Text = Field(max_length=128)
    box: list[float] = Field(description="[x1, y1, x2, y2] in pixels of the image")


class FeedbackIn(BaseModel):
    verdict: str = Field(description="correct | wrong", examples=["wrong"])
    true_label: Text | None = Field(None, max_length=128, examples=["7"])
    comment: Text | None = Field(None, max_length=2000)
    boxes: list[BoxVerdictIn] | None = Field(
        None, max_length=300, description="Detection: a verdict per shown box (unlisted: correct)."
    )
    missed: list[MissedBoxIn] | None = Field(
        None, max_length=100, description="Detection: boxes drawn around objects the model missed."
    )


class FeedbackOut(BaseModel):
    id: str
    prediction_id: str
    verdict: str
    true_label: str | None
    boxes: list[dict[str, Any]] | None = None
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
    epochs: int | None = Field(
        None, ge=1, le=500, description="Default: the project's task default (15 classifying)."
    )
    architecture: str | None = Field(
        None, max_length=64, description="Default: smallcnn, or a detection project's detector."
    )
    kfold: int = Field(0, ge=0, le=20)
    prune_ratio: float | None = Field(None, gt=0.0, lt=1.0)
    quantize: bool = Field(
        False,
        description="Also make an INT8 variant (ONNX Runtime, QDQ) and register it as the "
        "candidate (classifiers only); one losing more than 0.5 points of hold-out accuracy "
        "is refused and the fp32 model is the candidate.",
    )


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

"""Label Studio behind one adapter: the only module that imports ``label_studio_sdk`` (2.x,
``LabelStudio`` client). Everything it returns is the project's own types.

Two task types: ``classification`` (one ``<Choices>`` answer per image) and ``detection``
(``<RectangleLabels>``: boxes). Outside this module a box is the detection contract's dict
``{"label": "7", "box": [x1, y1, x2, y2]}`` in pixels of the original image (plus ``"score"``
when predicted); Label Studio keeps rectangles in percent of the image, and
``boxes_to_rectangles`` / ``rectangles_to_boxes`` are the only translation between the two.

Calls are retried with exponential backoff on connection errors, timeouts and 5xx answers;
anything else (4xx) is a real error and is raised at once as ``LabelStudioError``."""

from __future__ import annotations

import colorsys
import logging
import math
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar
from xml.sax.saxutils import quoteattr

from quarkflow_core.errors import InvalidInput, QuarkflowError

log = logging.getLogger("quarkflow.labeling")
T = TypeVar("T")

IMAGE_FIELD, CHOICE_FIELD = "image", "label"
RECTANGLE_FIELD = CHOICE_FIELD  # the <RectangleLabels> control's name in detection projects
CLASSIFICATION, DETECTION = "classification", "detection"
TASK_TYPES = (CLASSIFICATION, DETECTION)
RECTANGLE_TYPE = "rectanglelabels"
# Tableau's 10 + 10 light: distinct on screen; past 20 labels, golden-angle hues
PALETTE = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
    "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
    "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5",
    "#c49c94", "#f7b6d2", "#c7c7c7", "#dbdb8d", "#9edae5",
)  # fmt: skip


class LabelStudioError(QuarkflowError):
    code = "labelstudio_error"


class LabelStudioUnavailable(LabelStudioError):
    code = "labelstudio_unavailable"


def label_config(classes: Iterable[str]) -> str:
    """Image classification: one image, one required single choice per class."""
    choices = "".join(f"<Choice value={quoteattr(c)}/>" for c in classes)
    return (
        f'<View><Image name="{IMAGE_FIELD}" value="${IMAGE_FIELD}" zoom="true"/>'
        f'<Choices name="{CHOICE_FIELD}" toName="{IMAGE_FIELD}" choice="single" '
        f'required="true" showInLine="true">{choices}</Choices></View>'
    )


def label_colour(i: int) -> str:
    """The ``i``-th label's colour: the palette, then golden-angle hues (all distinct)."""
    if i < len(PALETTE):
        return PALETTE[i]
    hue = ((i - len(PALETTE)) * 0.618033988749895 + 0.07) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.75, 0.85)
    return f"#{round(r * 255):02x}{round(g * 255):02x}{round(b * 255):02x}"


def rectangle_config(classes: Iterable[str]) -> str:
    """Object detection: one image, any number of labelled rectangles (none is a valid answer:
    "no objects"), a distinct colour per label."""
    labels = "".join(
        f"<Label value={quoteattr(c)} background={quoteattr(label_colour(i))}/>"
        for i, c in enumerate(classes)
    )
    return (
        f'<View><Image name="{IMAGE_FIELD}" value="${IMAGE_FIELD}" zoom="true"/>'
        f'<RectangleLabels name="{RECTANGLE_FIELD}" toName="{IMAGE_FIELD}" strokeWidth="2" '
        f'canRotate="false">{labels}</RectangleLabels></View>'
    )


def config_for(classes: Iterable[str], task_type: str = CLASSIFICATION) -> str:
    """The labelling config of a task type (``TASK_TYPES``)."""
    if task_type == CLASSIFICATION:
        return label_config(classes)
    if task_type == DETECTION:
        return rectangle_config(classes)
    raise InvalidInput(
        f"unknown task type {task_type!r}; valid task types: {', '.join(TASK_TYPES)}",
        code="unknown_task_type",
    )


def config_task_type(config: str | None) -> str | None:
    """Which task type a Label Studio labelling config is (None: neither of ours)."""
    if not config:
        return None
    if "<RectangleLabels" in config:
        return DETECTION
    if "<Choices" in config:
        return CLASSIFICATION
    return None


# --------------------------------------------------------------------------- boxes


def _box(b: dict[str, Any]) -> tuple[str, float, float, float, float]:
    try:
        x1, y1, x2, y2 = (float(v) for v in b["box"])
        label = str(b["label"])
    except (KeyError, TypeError, ValueError):
        raise InvalidInput(
            f"a box is {{'label': ..., 'box': [x1, y1, x2, y2]}}, not {b!r}", code="bad_box"
        ) from None
    if not (x2 > x1 and y2 > y1) or not all(map(math.isfinite, (x1, y1, x2, y2))):
        raise InvalidInput(f"box {[x1, y1, x2, y2]} needs x2 > x1 and y2 > y1", code="bad_box")
    return label, x1, y1, x2, y2


def _size(width: Any, height: Any) -> tuple[float, float]:
    try:
        w, h = float(width), float(height)
    except (TypeError, ValueError):
        raise InvalidInput(
            f"the image size is needed to convert boxes, got {width!r} x {height!r}",
            code="bad_image_size",
        ) from None
    if not (w > 0 and h > 0):
        raise InvalidInput(f"image size {w:g} x {h:g} must be positive", code="bad_image_size")
    return w, h


def boxes_to_rectangles(
    boxes: Iterable[dict[str, Any]],
    *,
    width: int | float,
    height: int | float,
    from_name: str = RECTANGLE_FIELD,
    to_name: str = IMAGE_FIELD,
    scored: bool = False,
) -> list[dict[str, Any]]:
    """Pixel boxes -> Label Studio ``rectanglelabels`` result items (percent of the image, no
    rotation, a fresh region id each). ``scored``: carry each box's ``score`` (predictions)."""
    w, h = _size(width, height)
    out = []
    for b in boxes:
        label, x1, y1, x2, y2 = _box(b)
        item: dict[str, Any] = {
            "id": uuid.uuid4().hex[:10],
            "from_name": from_name,
            "to_name": to_name,
            "type": RECTANGLE_TYPE,
            "original_width": int(w) if w.is_integer() else w,
            "original_height": int(h) if h.is_integer() else h,
            "image_rotation": 0,
            "value": {
                "x": x1 / w * 100.0,
                "y": y1 / h * 100.0,
                "width": (x2 - x1) / w * 100.0,
                "height": (y2 - y1) / h * 100.0,
                "rotation": 0,
                "rectanglelabels": [label],
            },
        }
        if scored and b.get("score") is not None:
            item["score"] = float(b["score"])
        out.append(item)
    return out


def rectangles_to_boxes(
    result: Iterable[dict[str, Any]] | None,
    *,
    width: int | float | None = None,
    height: int | float | None = None,
) -> list[dict[str, Any]]:
    """Label Studio result items -> pixel boxes (the contract's dicts, ``score`` kept when the
    item has one). The image size is the item's ``original_width``/``original_height`` (what
    the annotator's browser saw) when present, else ``width``/``height``. Items other than
    labelled rectangles are skipped; a rotated rectangle becomes its axis-aligned bounds
    (clipped to the image)."""
    out = []
    for item in result or []:
        value = item.get("value") or {}
        labels = value.get("rectanglelabels") or []
        if item.get("type") != RECTANGLE_TYPE or not labels:
            continue
        w, h = _size(item.get("original_width") or width, item.get("original_height") or height)
        x, y = float(value["x"]) * w / 100.0, float(value["y"]) * h / 100.0
        bw, bh = float(value["width"]) * w / 100.0, float(value["height"]) * h / 100.0
        angle = float(value.get("rotation") or 0.0) % 360.0
        if angle:  # Label Studio turns the rectangle clockwise about its (x, y) corner
            cos, sin = math.cos(math.radians(angle)), math.sin(math.radians(angle))
            xs = [x, x + bw * cos, x + bw * cos - bh * sin, x - bh * sin]
            ys = [y, y + bw * sin, y + bw * sin + bh * cos, y + bh * cos]
            x1, y1 = max(min(xs), 0.0), max(min(ys), 0.0)
            x2, y2 = min(max(xs), w), min(max(ys), h)
        else:
            x1, y1, x2, y2 = x, y, x + bw, y + bh
        box: dict[str, Any] = {"label": str(labels[0]), "box": [x1, y1, x2, y2]}
        if item.get("score") is not None:
            box["score"] = float(item["score"])
        out.append(box)
    return out


# --------------------------------------------------------------------------- our types


@dataclass(frozen=True)
class Project:
    id: int
    title: str
    classes: list[str]
    task_type: str = CLASSIFICATION


@dataclass(frozen=True)
class TaskSpec:
    """One image to label, with the model's guess as a pre-annotation.

    Detection: ``boxes`` (the predicted pixel boxes, with scores; ``[]`` is a valid "nothing
    found") and the image's ``width``/``height`` in pixels; ``score`` is then the overall
    score (default: the boxes' mean score)."""

    image_sha256: str
    image_url: str
    predicted_label: str | None = None
    score: float | None = None
    model_version: str | None = None
    boxes: list[dict[str, Any]] | None = None
    width: int | None = None
    height: int | None = None


@dataclass(frozen=True)
class PulledAnnotation:
    task_id: int
    annotation_id: int
    image_sha256: str
    label: str  # the class (classification); "" for a detection annotation
    annotator: str
    created_at: datetime | None
    boxes: list[dict[str, Any]] | None = None  # pixel boxes (detection; [] = no objects)

    @property
    def external_id(self) -> str:
        return f"{self.task_id}:{self.annotation_id}"


def _choice(result: list[dict[str, Any]] | None) -> str | None:
    for item in result or []:
        if item.get("from_name") == CHOICE_FIELD and item.get("type") == "choices":
            choices = item.get("value", {}).get("choices") or []
            if choices:
                return str(choices[0])
    return None


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _get(obj: Any, key: str, default: Any = None) -> Any:
    if isinstance(obj, dict):
        return obj.get(key, default)
    return getattr(obj, key, default)


def _annotator(ann: Any) -> str:
    who = _get(ann, "created_username") or _get(ann, "completed_by")
    if isinstance(who, dict):
        who = who.get("email") or who.get("id")
    return str(who) if who is not None else "unknown"


def _is_detection(data: dict[str, Any], result: list[dict[str, Any]] | None) -> bool:
    return data.get("qf_task_type") == DETECTION or any(
        item.get("type") == RECTANGLE_TYPE for item in result or []
    )


def parse_annotation(
    task: Any, ann: Any, *, task_type: str | None = None
) -> PulledAnnotation | None:
    """A Label Studio annotation (SDK object or webhook JSON) -> PulledAnnotation, or None
    for cancelled/skipped or empty ones.

    Detection (``task_type``, else the task's ``qf_task_type`` or rectangles in the result):
    ``boxes`` holds the pixel boxes and ``label`` is ""; no boxes at all is a valid answer
    ("no objects"), not an empty annotation."""
    if _get(ann, "was_cancelled"):
        return None
    result = _get(ann, "result")
    data = _get(task, "data") or {}
    if not isinstance(data, dict):
        data = {}
    sha = data.get("qf_sha256")
    boxes = None
    if task_type == DETECTION or (task_type is None and _is_detection(data, result)):
        boxes = rectangles_to_boxes(
            result, width=data.get("qf_width"), height=data.get("qf_height")
        )
        label: str | None = ""
    else:
        label = _choice(result)
    if label is None or not sha:
        return None
    created = _get(ann, "created_at")
    if isinstance(created, str):
        created = datetime.fromisoformat(created.replace("Z", "+00:00"))
    return PulledAnnotation(
        task_id=int(_get(task, "id")),
        annotation_id=int(_get(ann, "id")),
        image_sha256=sha,
        label=label,
        annotator=_annotator(ann),
        created_at=created,
        boxes=boxes,
    )


def webhook_project(payload: dict[str, Any]) -> tuple[int | None, str | None]:
    """The Label Studio project a webhook body is about: (id, title). Label Studio sends the
    project with the payload, and the task names its project's id; (None, None) when neither
    does. ``review.project_for_labelstudio`` says which of our projects it is."""
    project, task = payload.get("project"), payload.get("task")
    ls_id, title = project, None
    if isinstance(project, dict):
        ls_id, title = project.get("id"), project.get("title")
    if ls_id is None and isinstance(task, dict):
        ls_id = task.get("project")
    if ls_id is not None and not str(ls_id).isdigit():
        raise InvalidInput(f"the webhook names Label Studio project {ls_id!r}: not an id")
    return (None if ls_id is None else int(ls_id)), (str(title) if title else None)


def parse_webhook(
    payload: dict[str, Any], *, task_type: str | None = None
) -> list[PulledAnnotation]:
    """ANNOTATION_CREATED / ANNOTATION_UPDATED / ANNOTATIONS_CREATED webhook bodies (the task
    type as ``parse_annotation`` tells it, unless given)."""
    task = payload.get("task") or {}
    anns = payload.get("annotations") or (
        [payload["annotation"]] if payload.get("annotation") else []
    )
    out = []
    for ann in anns:
        pulled = parse_annotation(task, ann, task_type=task_type)
        if pulled is not None:
            out.append(pulled)
    return out


class LabelStudio:
    def __init__(
        self,
        url: str,
        token: str,
        *,
        timeout_s: float = 30.0,
        attempts: int = 5,
        backoff_s: float = 0.5,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        from label_studio_sdk import LabelStudio as Client

        self.url = url.rstrip("/")
        self.attempts = attempts
        self.backoff_s = backoff_s
        self.sleep = sleep
        self.client = Client(base_url=self.url, api_key=token, timeout=timeout_s)

    # ------------------------------------------------------------------ plumbing

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        import httpx
        from label_studio_sdk.core.api_error import ApiError

        delay = self.backoff_s
        for attempt in range(1, self.attempts + 1):
            try:
                return fn()
            except ApiError as exc:
                status = exc.status_code or 0
                if status < 500 or attempt == self.attempts:
                    kind = LabelStudioUnavailable if status >= 500 else LabelStudioError
                    raise kind(f"Label Studio {what} failed: HTTP {status} {exc.body}") from None
                reason = f"HTTP {status}"
            except (httpx.TransportError, OSError) as exc:
                if attempt == self.attempts:
                    raise LabelStudioUnavailable(
                        f"Label Studio at {self.url} is unreachable ({what}): {exc}; "
                        "check QF_LABELSTUDIO_URL"
                    ) from None
                reason = type(exc).__name__
            log.warning("Label Studio %s: %s; retry %d in %.1fs", what, reason, attempt, delay)
            self.sleep(delay)
            delay = min(delay * 2, 30.0)
        raise AssertionError("unreachable")

    # ------------------------------------------------------------------ projects

    def ensure_project(
        self, title: str, classes: list[str], task_type: str = CLASSIFICATION
    ) -> Project:
        """Find the project by title or create it; keep its labels equal to ``classes``. A
        project of the other task type is refused (its tasks and annotations would not fit):
        pick another title."""
        config = config_for(classes, task_type)
        for proj in self._call("list projects", lambda: list(self.client.projects.list())):
            if proj.title == title:
                if proj.label_config != config:
                    found = config_task_type(proj.label_config)
                    if found is not None and found != task_type:
                        raise LabelStudioError(
                            f"Label Studio project {title!r} (id {proj.id}) is a {found} "
                            f"project, not {task_type}: use another project title",
                            code="labelstudio_task_type",
                        )
                    self._call(
                        "update project",
                        lambda p=proj: self.client.projects.update(id=p.id, label_config=config),
                    )
                return Project(proj.id, title, list(classes), task_type)
        proj = self._call(
            "create project",
            lambda: self.client.projects.create(
                title=title,
                label_config=config,
                description="Quarkflow review queue: low-confidence and disputed predictions.",
            ),
        )
        return Project(proj.id, title, list(classes), task_type)

    # ------------------------------------------------------------------ tasks

    def existing_tasks(self, project: Project) -> dict[str, int]:
        """image sha256 -> task id for tasks already in the project (recovers from a crash
        between creating a task and recording its id)."""
        tasks = self._call(
            "list tasks",
            lambda: list(self.client.tasks.list(project=project.id, fields="task_only")),
        )
        out = {}
        for t in tasks:
            sha = (_get(t, "data") or {}).get("qf_sha256")
            if sha:
                out[sha] = int(_get(t, "id"))
        return out

    def create_task(self, project: Project, spec: TaskSpec) -> int:
        """A task for the image, with the model's guess as ONE prediction (Label Studio shows
        only one): the label, or (detection, ``spec.boxes`` set) all the boxes at once."""
        data: dict[str, Any] = {IMAGE_FIELD: spec.image_url, "qf_sha256": spec.image_sha256}
        result: list[dict[str, Any]] | None = None
        score = spec.score
        if spec.boxes is not None:  # checked before anything is created
            boxes = list(spec.boxes)
            result = boxes_to_rectangles(boxes, width=spec.width, height=spec.height, scored=True)
            data.update(qf_task_type=DETECTION, qf_width=spec.width, qf_height=spec.height)
            if score is None:
                score = _mean([float(b["score"]) for b in boxes if b.get("score") is not None])
        elif spec.predicted_label is not None:
            result = [
                {
                    "from_name": CHOICE_FIELD,
                    "to_name": IMAGE_FIELD,
                    "type": "choices",
                    "value": {"choices": [spec.predicted_label]},
                }
            ]
        task = self._call(
            "create task",
            lambda: self.client.tasks.create(project=project.id, data=data),
        )
        task_id = int(_get(task, "id"))
        if result is not None:
            self._create_prediction(task_id, result, score, spec.model_version)
        return task_id

    def _create_prediction(
        self,
        task_id: int,
        result: list[dict[str, Any]],
        score: float | None,
        model_version: str | None,
    ) -> None:
        # Label Studio refuses a null model version or score: leave out what is unknown
        known = {"score": score, "model_version": model_version}
        extra = {k: v for k, v in known.items() if v is not None}
        self._call(
            "create prediction",
            lambda: self.client.predictions.create(task=task_id, result=result, **extra),
        )

    def annotations(self, project: Project) -> list[PulledAnnotation]:
        """Every completed annotation in the project (with its boxes in a detection one)."""
        task_type = project.task_type if project.task_type == DETECTION else None
        tasks = self._call(
            "list annotated tasks",
            lambda: list(
                self.client.tasks.list(project=project.id, fields="all", only_annotated=True)
            ),
        )
        out = []
        for task in tasks:
            anns = _get(task, "annotations") or []
            if not anns:
                anns = self._call(
                    "list annotations",
                    lambda t=task: self.client.annotations.list(id=_get(t, "id")),
                )
            for ann in anns:
                pulled = parse_annotation(task, ann, task_type=task_type)
                if pulled is not None:
                    out.append(pulled)
        return out

    def annotate(self, task_id: int, label: str) -> int:
        """Submit an annotation as the token's user (what an annotator's click does)."""
        result = [
            {
                "from_name": CHOICE_FIELD,
                "to_name": IMAGE_FIELD,
                "type": "choices",
                "value": {"choices": [label]},
            }
        ]
        return self._annotate(task_id, result)

    def annotate_boxes(
        self,
        task_id: int,
        boxes: list[dict[str, Any]],
        *,
        width: int | float,
        height: int | float,
    ) -> int:
        """Submit a detection annotation (pixel boxes; ``[]`` = no objects) as the token's
        user, as an annotator drawing them would."""
        return self._annotate(task_id, boxes_to_rectangles(boxes, width=width, height=height))

    def _annotate(self, task_id: int, result: list[dict[str, Any]]) -> int:
        ann = self._call(
            "create annotation",
            lambda: self.client.annotations.create(id=task_id, result=result),
        )
        return int(_get(ann, "id"))

    def add_webhook(self, project: Project, url: str, secret: str) -> int:
        """Send annotation events of the project to ``url`` with a shared-secret header (one
        webhook per project: several projects may send to the same ``url``)."""
        for hook in self._call("list webhooks", lambda: list(self.client.webhooks.list())):
            if hook.url == url and _get(hook, "project") == project.id:
                return int(hook.id)
        hook = self._call(
            "create webhook",
            lambda: self.client.webhooks.create(
                url=url,
                project=project.id,
                send_payload=True,
                send_for_all_actions=False,
                actions=["ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_CREATED"],
                headers={"X-Quarkflow-Webhook-Secret": secret},
            ),
        )
        return int(hook.id)

    def ensure_gcs_source(self, project: Project, bucket: str, prefix: str, emulator: bool) -> int:
        """A GCS import storage on the project, so that its ``gs://`` image URLs resolve
        inside Label Studio (through the emulator when STORAGE_EMULATOR_HOST is set there)."""
        existing = self._call(
            "list GCS storages",
            lambda: list(self.client.import_storage.gcs.list(project=project.id)),
        )
        for st in existing:
            if st.bucket == bucket:
                return int(st.id)
        storage = self._call(
            "create GCS import storage",
            lambda: self.client.import_storage.gcs.create(
                project=project.id,
                bucket=bucket,
                prefix=prefix or None,
                use_blob_urls=True,
                presign=False,
                title="Quarkflow images",
            ),
        )
        return int(storage.id)

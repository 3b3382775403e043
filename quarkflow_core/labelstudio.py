"""Label Studio behind one adapter: the only module that imports ``label_studio_sdk`` (2.x,
``LabelStudio`` client). Everything it returns is the project's own types.

Calls are retried with exponential backoff on connection errors, timeouts and 5xx answers;
anything else (4xx) is a real error and is raised at once as ``LabelStudioError``."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar
from xml.sax.saxutils import quoteattr

from quarkflow_core.errors import InvalidInput, QuarkflowError

log = logging.getLogger("quarkflow.labeling")
T = TypeVar("T")

IMAGE_FIELD, CHOICE_FIELD = "image", "label"


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


@dataclass(frozen=True)
class Project:
    id: int
    title: str
    classes: list[str]


@dataclass(frozen=True)
class TaskSpec:
    """One image to label, with the model's guess as a pre-annotation."""

    image_sha256: str
    image_url: str
    predicted_label: str | None = None
    score: float | None = None
    model_version: str | None = None


@dataclass(frozen=True)
class PulledAnnotation:
    task_id: int
    annotation_id: int
    image_sha256: str
    label: str
    annotator: str
    created_at: datetime | None

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


def _get(obj: Any, key: str, default: Any = None) -> Any:
    if isinstance(obj, dict):
        return obj.get(key, default)
    return getattr(obj, key, default)


def _annotator(ann: Any) -> str:
    who = _get(ann, "created_username") or _get(ann, "completed_by")
    if isinstance(who, dict):
        who = who.get("email") or who.get("id")
    return str(who) if who is not None else "unknown"


def parse_annotation(task: Any, ann: Any) -> PulledAnnotation | None:
    """A Label Studio annotation (SDK object or webhook JSON) -> PulledAnnotation, or None
    for cancelled/skipped or empty ones."""
    if _get(ann, "was_cancelled"):
        return None
    label = _choice(_get(ann, "result"))
    data = _get(task, "data") or {}
    sha = data.get("qf_sha256") if isinstance(data, dict) else None
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


def parse_webhook(payload: dict[str, Any]) -> list[PulledAnnotation]:
    """ANNOTATION_CREATED / ANNOTATION_UPDATED / ANNOTATIONS_CREATED webhook bodies."""
    task = payload.get("task") or {}
    anns = payload.get("annotations") or (
        [payload["annotation"]] if payload.get("annotation") else []
    )
    out = []
    for ann in anns:
        pulled = parse_annotation(task, ann)
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

    def ensure_project(self, title: str, classes: list[str]) -> Project:
        """Find the project by title or create it; keep its choices equal to ``classes``."""
        config = label_config(classes)
        for proj in self._call("list projects", lambda: list(self.client.projects.list())):
            if proj.title == title:
                if proj.label_config != config:
                    self._call(
                        "update project",
                        lambda p=proj: self.client.projects.update(id=p.id, label_config=config),
                    )
                return Project(proj.id, title, list(classes))
        proj = self._call(
            "create project",
            lambda: self.client.projects.create(
                title=title,
                label_config=config,
                description="Quarkflow review queue: low-confidence and disputed predictions.",
            ),
        )
        return Project(proj.id, title, list(classes))

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
        task = self._call(
            "create task",
            lambda: self.client.tasks.create(
                project=project.id,
                data={IMAGE_FIELD: spec.image_url, "qf_sha256": spec.image_sha256},
            ),
        )
        task_id = int(_get(task, "id"))
        if spec.predicted_label is not None:
            result = [
                {
                    "from_name": CHOICE_FIELD,
                    "to_name": IMAGE_FIELD,
                    "type": "choices",
                    "value": {"choices": [spec.predicted_label]},
                }
            ]
            # Label Studio refuses a null model version or score: leave out what is unknown
            known = {"score": spec.score, "model_version": spec.model_version}
            extra = {k: v for k, v in known.items() if v is not None}
            self._call(
                "create prediction",
                lambda: self.client.predictions.create(task=task_id, result=result, **extra),
            )
        return task_id

    def annotations(self, project: Project) -> list[PulledAnnotation]:
        """Every completed annotation in the project."""
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
                pulled = parse_annotation(task, ann)
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

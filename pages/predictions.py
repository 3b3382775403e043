"""Predictions explorer: thumbnails with label, confidence and feedback; open one as a card
(image, top-k, calibrated confidence, version, latency, review state, verdicts). In a
detection project the thumbnails and the card show the image with the boxes the model showed,
and the card draws each box in the colour of the expert's verdict on it."""

import pandas as pd
import plotly.express as px
import streamlit as st

from app import wb
from quarkflow_core import analytics
from quarkflow_core import formatting as fmt
from quarkflow_core.detection.draw import (
    VERDICT_WORDS,
    boxes_with_verdicts,
    shown_summary,
    verdict_counts,
)
from quarkflow_core.predictions import get_prediction, prediction_dict

PER_PAGE = 24
# Material icons (shipped with Streamlit) render where no emoji font is installed.
VERDICT_ICON = {
    "correct": ":green[:material/check_circle:]",
    "wrong": ":red[:material/cancel:]",
    None: "",
}
# draw.VERDICT_COLOURS as Streamlit's badge colours, for the legend under a detection
LEGEND_COLOUR = {
    "correct": "green",
    "wrong_label": "orange",
    "bad_box": "orange",
    "corrected": "blue",
    "not_object": "red",
    "missed": "violet",
    "unjudged": "gray",
}
REVIEW_COLOR = {
    "open": "orange",
    "sent": "blue",
    "disputed": "red",
    "resolved": "green",
    "dismissed": "gray",
}


def thumbnails(rows: list[dict], boxes: dict[str, list[dict]] | None = None) -> None:
    """Six to a row; a detection's with its shown boxes drawn (``boxes`` by prediction id)."""
    for i, r in enumerate(rows):
        if i % 6 == 0:  # a row of its own: captions of two lines do not shift the next row
            cols = st.columns(6)
        with cols[i % 6]:
            if boxes is None:
                st.image(wb.image(r["storage_key"]), width=96)
                said = f"**{r['label']}** {fmt.percent(r['confidence'])}"
            else:
                shown = boxes.get(r["id"]) or []
                st.image(wb.boxed_thumbnail(r["storage_key"], shown, side=150), width=150)
                said = f"**{shown_summary(shown)}**"
                if any(b.get("shown", True) for b in shown):
                    said += f" · top {r['label']} at {fmt.percent(r['confidence'], 0)}"
            st.caption(
                f"`#{i + 1}` {said} {VERDICT_ICON[r['verdict']]} {fmt.version(r['model_version'])}"
            )


def topk_chart(topk: list[dict]) -> None:
    if not topk:
        st.caption("No top-k was recorded for this prediction.")
        return
    df = pd.DataFrame(topk, columns=["label", "confidence"])
    df["label"] = df["label"].astype(str)
    df["text"] = df["confidence"].map(fmt.percent)
    fig = px.bar(
        df.iloc[::-1],  # the most likely class on top
        x="confidence",
        y="label",
        orientation="h",
        text="text",
        title="Top-k (calibrated)",
        range_x=[0, 1.2],  # room for the label of a bar near 100%
    )
    fig.update_traces(hovertemplate="%{y}: %{x:.2%}<extra></extra>", textposition="outside")
    fig.update_layout(
        xaxis={"tickformat": ".0%", "tickvals": [0, 0.25, 0.5, 0.75, 1], "title": None},
        yaxis={"type": "category", "title": None},
        height=80 + 36 * len(df),
        margin={"t": 40, "b": 10, "l": 10, "r": 10},
    )
    st.plotly_chart(fig, width="stretch")


def review_state(review: dict | None) -> str:
    if review is None:
        return "not in review"
    color = REVIEW_COLOR.get(review["state"], "gray")
    return f":{color}-badge[{review['state']}] ({fmt.words(review['reason'])})"


def feedback_list(feedback: list[dict]) -> None:
    st.markdown("**Feedback**")
    if not feedback:
        st.caption(
            "No verdict yet: experts give one with `POST /api/v1/predictions/{id}/feedback` "
            "(or the demo's Correct / Wrong buttons)."
        )
        return
    lines = []
    for f in feedback:
        said = f"{VERDICT_ICON[f['verdict']]} **{f['verdict']}**"
        if f["verdict"] == "wrong" and wb.is_detection():
            pass  # what was wrong is box by box, drawn on the image
        elif f["verdict"] == "wrong":
            said += f", true label **{f['true_label']}**" if f["true_label"] else ", no label"
        who = f["user"] or "anonymous (demo)"
        line = f"- {said} by {who}, {fmt.when(f['created_at'])}"
        if f["comment"]:
            line += f": “{f['comment']}”"
        lines.append(line)
    st.markdown("\n".join(lines))


def box_feedback(feedback: list[dict], said: list[dict]) -> None:
    """The verdicts (who, when) and, for a detection, what each said box by box."""
    feedback_list(feedback)
    parts = []
    for f in said:
        counts = verdict_counts(f["boxes"])
        if counts:
            parts.append(
                ", ".join(f"{n} {VERDICT_WORDS[v]}" for v, n in counts.items())
                + f" ({f['verdict']}, {fmt.relative(f['created_at'])})"
            )
    if parts:
        st.caption("Box by box: " + "; ".join(parts))


def verdict_legend(drawn: list[dict]) -> str:
    """The colours on the image, with how many boxes each: ":green-badge[2 correct] ..."."""
    return " ".join(
        f":{LEGEND_COLOUR[v]}-badge[{n} {VERDICT_WORDS[v]}]"
        for v, n in verdict_counts(drawn).items()
    )


def detection_card(row: dict, detail: dict, feedback: list[dict]) -> None:
    """The image with the boxes the model showed, each in the colour of the latest verdict on
    it (grey until an expert answers), beside the facts and the box verdicts."""
    boxes = detail.get("boxes") or []
    judged = list(detail["feedback"])
    latest = judged[-1] if judged else None
    drawn = boxes_with_verdicts(
        boxes,
        latest.get("boxes") if latest else None,
        verdict=latest["verdict"] if latest else None,
    )
    said = [
        {**f, "boxes": boxes_with_verdicts(boxes, f.get("boxes"), verdict=f["verdict"])}
        for f in judged
    ]
    with st.container(border=True):
        pic, facts = st.columns([3, 2])
        pic.image(
            wb.boxed(row["storage_key"], drawn, colour_by="verdict", min_side=640, label_px=20),
            width="stretch",
            caption=f"{detail['width']}×{detail['height']} px · the boxes the model showed"
            + (", in the colour of the latest verdict" if latest else " (no verdict yet)"),
        )
        shown = [b for b in boxes if b.get("shown", True)]
        below = len(boxes) - len(shown)
        big = facts.columns(2)
        big[0].metric(
            "Boxes shown",
            fmt.number(len(shown)),
            help="Scored at or over the model's threshold: what the expert saw"
            + (f"; {below} more logged just under it" if below else ""),
        )
        big[1].metric(
            "Top box",
            f"{detail['label']} at {fmt.percent(detail['confidence'])}" if shown else "none",
            help="The most confident shown box: the prediction's label and confidence",
        )
        facts.markdown(
            "\n".join(
                [
                    f"- **Model** {fmt.version(detail['model_version'])}",
                    f"- **Latency** {fmt.ms(detail['latency_ms'])}",
                    f"- **Created** {fmt.when(detail['created_at'])}",
                    f"- **Review** {review_state(detail['review'])}",
                ]
            )
        )
        if drawn:
            facts.markdown(verdict_legend(drawn))
        if below:
            facts.caption(
                f"{below} box(es) scored just under the threshold are logged but not drawn: "
                "nobody saw them."
            )
        with facts:
            box_feedback(feedback, said)
        st.caption(
            f"prediction {detail['id']} · image sha256 {fmt.short_id(detail['image_sha256'], 12)}"
        )


def card(row: dict, pid: int) -> None:
    with wb.session() as s:
        pred = get_prediction(session=s, prediction_id=row["id"], project_id=pid)
        detail = prediction_dict(s, pred)
        feedback = analytics.prediction_feedback(session=s, prediction_id=row["id"], project_id=pid)
    if "boxes" in detail:
        detection_card(row, detail, feedback)
        return
    with st.container(border=True):
        pic, facts, chart = st.columns([1, 2, 3])
        pic.image(wb.image(row["storage_key"]), width=140)
        big = facts.columns(2)
        big[0].metric("Predicted label", detail["label"])
        big[1].metric("Calibrated confidence", fmt.percent(detail["confidence"]))
        facts.markdown(
            "\n".join(
                [
                    f"- **Model** {fmt.version(detail['model_version'])}",
                    f"- **Latency** {fmt.ms(detail['latency_ms'])}",
                    f"- **Created** {fmt.when(detail['created_at'])}",
                    f"- **Review** {review_state(detail['review'])}",
                ]
            )
        )
        with chart:
            topk_chart(detail["topk"])
        feedback_list(feedback)
        st.caption(
            f"prediction {detail['id']} · image sha256 {fmt.short_id(detail['image_sha256'], 12)}"
        )


def body() -> None:
    wb.title("Predictions")
    pid = wb.project_id()
    with wb.session() as s:
        f = wb.filters(s, key="predictions")
        page = st.sidebar.number_input("Page", min_value=1, value=1, step=1)
        total, rows = analytics.list_predictions(
            session=s, filters=f, limit=PER_PAGE, offset=(page - 1) * PER_PAGE, project_id=pid
        )
        # with nothing in range: is there anything at all? (decides what the hint says)
        ever = total or analytics.count_predictions(
            session=s, filters=analytics.Filters(), project_id=pid
        )
    pages = max(1, -(-total // PER_PAGE))
    st.caption(f"{total:,} predictions match; page {page:,} of {pages:,}, newest first")
    if not rows:
        if total:
            st.info(f"Page {page:,} is past the end: there are {pages:,} pages.")
        else:
            st.info(wb.no_predictions_hint(ever))
        return
    boxes = None
    if wb.is_detection():
        with wb.session() as s:
            boxes = {
                r["id"]: get_prediction(session=s, prediction_id=r["id"], project_id=pid).boxes
                for r in rows
            }
    thumbnails(rows, boxes)

    def said(i: int) -> str:
        if boxes is None:
            return f"{rows[i]['label']} at {fmt.percent(rows[i]['confidence'])}"
        return shown_summary(boxes[rows[i]["id"]])

    chosen = st.selectbox(
        "Open a prediction",
        range(len(rows)),
        format_func=lambda i: (
            f"#{i + 1}: {said(i)}, "
            f"{fmt.version(rows[i]['model_version'])}, {fmt.relative(rows[i]['created_at'])}"
            + (f", marked {rows[i]['verdict']}" if rows[i]["verdict"] else "")
        ),
        key="open-prediction",
    )
    card(rows[chosen], pid)


wb.guarded(body)

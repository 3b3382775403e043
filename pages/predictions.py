"""Predictions explorer: thumbnails with label, confidence and feedback; open one as a card
(image, top-k, calibrated confidence, version, latency, review state, verdicts)."""

import pandas as pd
import plotly.express as px
import streamlit as st

from app import wb
from quarkflow_core import analytics
from quarkflow_core import formatting as fmt
from quarkflow_core.predictions import get_prediction, prediction_dict

PER_PAGE = 24
# Material icons (shipped with Streamlit) render where no emoji font is installed.
VERDICT_ICON = {
    "correct": ":green[:material/check_circle:]",
    "wrong": ":red[:material/cancel:]",
    None: "",
}
REVIEW_COLOR = {
    "open": "orange",
    "sent": "blue",
    "disputed": "red",
    "resolved": "green",
    "dismissed": "gray",
}


def thumbnails(rows: list[dict]) -> None:
    cols = st.columns(6)
    for i, r in enumerate(rows):
        with cols[i % 6]:
            st.image(wb.image(r["storage_key"]), width=96)
            st.caption(
                f"`#{i + 1}` **{r['label']}** {fmt.percent(r['confidence'])} "
                f"{VERDICT_ICON[r['verdict']]} {fmt.version(r['model_version'])}"
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
        if f["verdict"] == "wrong":
            said += f", true label **{f['true_label']}**" if f["true_label"] else ", no label"
        who = f["user"] or "anonymous (demo)"
        line = f"- {said} by {who}, {fmt.when(f['created_at'])}"
        if f["comment"]:
            line += f": “{f['comment']}”"
        lines.append(line)
    st.markdown("\n".join(lines))


def card(row: dict, pid: int) -> None:
    with wb.session() as s:
        pred = get_prediction(session=s, prediction_id=row["id"], project_id=pid)
        detail = prediction_dict(s, pred)
        feedback = analytics.prediction_feedback(session=s, prediction_id=row["id"], project_id=pid)
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
    thumbnails(rows)
    chosen = st.selectbox(
        "Open a prediction",
        range(len(rows)),
        format_func=lambda i: (
            f"#{i + 1}: {rows[i]['label']} at {fmt.percent(rows[i]['confidence'])}, "
            f"{fmt.version(rows[i]['model_version'])}, {fmt.relative(rows[i]['created_at'])}"
            + (f", marked {rows[i]['verdict']}" if rows[i]["verdict"] else "")
        ),
    )
    card(rows[chosen], pid)


wb.guarded(body)

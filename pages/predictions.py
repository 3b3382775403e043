"""Predictions explorer: thumbnails with label, confidence and feedback; open one for detail."""

import pandas as pd
import plotly.express as px
import streamlit as st

from app import wb
from quarkflow_core import analytics
from quarkflow_core.predictions import get_prediction, prediction_dict

PER_PAGE = 24


def body() -> None:
    st.title("Predictions")
    with wb.session() as s:
        f = wb.filters(s, key="predictions")
        page = st.sidebar.number_input("Page", min_value=1, value=1, step=1)
        total, rows = analytics.list_predictions(
            session=s, filters=f, limit=PER_PAGE, offset=(page - 1) * PER_PAGE
        )
    st.caption(f"{total:,} predictions match; page {page} of {max(1, -(-total // PER_PAGE))}")
    if not rows:
        st.info("Nothing to show for these filters.")
        return
    store = wb.storage()
    cols = st.columns(6)
    for i, r in enumerate(rows):
        with cols[i % 6]:
            st.image(store.get(r["storage_key"]), width=96)
            verdict = {"correct": "✅", "wrong": "❌", None: "·"}[r["verdict"]]
            st.caption(f"**{r['label']}** {r['confidence']:.0%} {verdict} v{r['model_version']}")
    chosen = st.selectbox("Open a prediction", [r["id"] for r in rows], format_func=lambda x: x[:8])
    with wb.session() as s:
        detail = prediction_dict(s, get_prediction(session=s, prediction_id=chosen))
    left, right = st.columns(2)
    topk = pd.DataFrame(detail["topk"], columns=["label", "confidence"])
    if topk.empty:
        left.caption("No top-k was recorded for this prediction.")
    else:
        left.plotly_chart(
            px.bar(
                topk,
                x="confidence",
                y="label",
                orientation="h",
                title="Top-k (calibrated)",
                range_x=[0, 1],
            ),
            width="stretch",
        )
    right.write(
        {
            k: detail[k]
            for k in (
                "id",
                "label",
                "confidence",
                "model_version",
                "latency_ms",
                "created_at",
                "review",
            )
        }
    )
    if detail["feedback"]:
        right.dataframe(pd.DataFrame(detail["feedback"]), hide_index=True)
    else:
        right.caption("No feedback yet.")


wb.guarded(body)

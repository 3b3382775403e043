"""Datasets: snapshots, per-class counts, what changed since the previous one, examples."""

import pandas as pd
import plotly.express as px
import streamlit as st

from app import wb
from quarkflow_core import analytics
from quarkflow_core.datasets import list_snapshots, snapshot_items
from quarkflow_core.schema import Split


def body() -> None:
    st.title("Datasets")
    with wb.session() as s:
        snaps = list_snapshots(session=s)
        if not snaps:
            st.info("No dataset snapshot yet: run `quarkflow seed-demo`.")
            return
        snap = st.selectbox(
            "Snapshot",
            snaps[::-1],
            format_func=lambda x: (
                f"#{x.id} {x.name} ({x.num_items:,} images, {x.created_at:%Y-%m-%d %H:%M})"
            ),
        )
        diff = analytics.snapshot_diff(session=s, snapshot_id=snap.id)
        label = st.selectbox("Examples of class", list(snap.classes))
        examples = [
            i
            for i in snapshot_items(session=s, snapshot_id=snap.id, split=Split.TRAIN)
            if i.label == label
        ][:12]
    df = pd.DataFrame(diff["rows"])
    left, right = st.columns(2)
    left.plotly_chart(
        px.bar(df, x="label", y="count", color="split", barmode="group", title="Images per class"),
        width="stretch",
    )
    since = f"since snapshot #{diff['previous']}" if diff["previous"] else "(first snapshot)"
    right.plotly_chart(
        px.bar(df, x="label", y="change", color="split", barmode="group", title=f"Change {since}"),
        width="stretch",
    )
    store = wb.storage()
    cols = st.columns(12)
    for col, item in zip(cols, examples, strict=False):
        col.image(store.get(item.storage_key), width=56)


wb.guarded(body)

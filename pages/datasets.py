"""Datasets: snapshots, per-class counts, what changed since the previous one, examples."""

import pandas as pd
import plotly.express as px
import streamlit as st

from app import wb
from quarkflow_core import analytics
from quarkflow_core import formatting as fmt
from quarkflow_core.datasets import list_snapshots, snapshot_items
from quarkflow_core.schema import DEFAULT_PROJECT_ID, Split


def body() -> None:
    wb.title("Datasets")
    pid = wb.project_id()
    with wb.session() as s:
        snaps = list_snapshots(session=s, project_id=pid)
        if not snaps:
            also = " (or `make demo`)" if pid == DEFAULT_PROJECT_ID else ""
            st.info(
                f"No dataset snapshot yet: run `{wb.command('seed-demo')}`{also} to "
                "ingest the 5,000 demo digits as the seed snapshot. Retraining then adds a "
                "snapshot with every batch of new labels."
            )
            return
        snap = st.selectbox(
            "Snapshot",
            snaps[::-1],
            format_func=lambda x: (
                f"#{x.id} {x.name}: {fmt.number(x.num_items)} images, {fmt.timestamp(x.created_at)}"
            ),
        )
        diff = analytics.snapshot_diff(session=s, snapshot_id=snap.id, project_id=pid)
    df = pd.DataFrame(diff["rows"])
    per_split = df.groupby("split")["count"].sum() if not df.empty else pd.Series(dtype=int)
    cols = st.columns(max(5, 2 + len(per_split)))
    cols[0].metric("Images", fmt.number(snap.num_items))
    cols[1].metric("Classes", fmt.number(len(snap.classes)))
    for col, (split, n) in zip(cols[2:], per_split.items(), strict=False):
        col.metric(f"{split} split", fmt.number(int(n)))
    st.caption(f"created {fmt.when(snap.created_at)}")
    if df.empty:
        st.info("This snapshot has no per-class counts: it holds no labelled images.")
        return
    left, right = st.columns(2)
    left.plotly_chart(
        px.bar(
            df, x="label", y="count", color="split", barmode="group", title="Images per class"
        ).update_layout(xaxis_type="category", yaxis_tickformat=",d"),
        width="stretch",
    )
    since = f"since snapshot #{diff['previous']}" if diff["previous"] else "(first snapshot)"
    right.plotly_chart(
        px.bar(
            df, x="label", y="change", color="split", barmode="group", title=f"Change {since}"
        ).update_layout(xaxis_type="category", yaxis_tickformat="+,d"),
        width="stretch",
    )
    st.subheader("Training examples")
    label = st.selectbox("Examples of class", list(snap.classes))
    with wb.session() as s:
        examples = [
            i
            for i in snapshot_items(
                session=s, snapshot_id=snap.id, split=Split.TRAIN, project_id=pid
            )
            if i.label == label
        ][:12]
    if not examples:
        st.caption(f"No training image of class {label} in this snapshot.")
        return
    cols = st.columns(12)
    for col, item in zip(cols, examples, strict=False):
        col.image(wb.image(item.storage_key), width=56)


wb.guarded(body)

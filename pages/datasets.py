"""Datasets: snapshots, per-class counts, what changed since the previous one, examples. A
detection snapshot counts boxes (per class, per split) and shows its examples with their
ground-truth boxes drawn."""

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
    detection = wb.is_detection()
    unit = "Boxes" if detection else "Images"  # what a detection snapshot's counts count
    df = pd.DataFrame(diff["rows"])
    per_split = df.groupby("split")["count"].sum() if not df.empty else pd.Series(dtype=int)
    cols = st.columns(max(5, (3 if detection else 2) + len(per_split)))
    cols[0].metric("Images", fmt.number(snap.num_items))
    cols[1].metric("Classes", fmt.number(len(snap.classes)))
    rest = cols[2:]
    if detection:
        cols[2].metric(
            "Boxes",
            fmt.number(int(per_split.sum())),
            help="Ground-truth boxes: the seed's, experts' answers, Label Studio's rectangles",
        )
        rest = cols[3:]
    for col, (split, n) in zip(rest, per_split.items(), strict=False):
        col.metric(f"{split} {'boxes' if detection else 'split'}", fmt.number(int(n)))
    st.caption(f"created {fmt.when(snap.created_at)}")
    if df.empty:
        st.info("This snapshot has no per-class counts: it holds no labelled images.")
        return
    left, right = st.columns(2)
    left.plotly_chart(
        px.bar(
            df,
            x="label",
            y="count",
            color="split",
            barmode="group",
            title=f"{unit} per class",
            category_orders={"label": list(snap.classes)},
            labels={"count": "boxes", "label": "class"} if detection else None,
        ).update_layout(xaxis_type="category", yaxis_tickformat=",d"),
        width="stretch",
    )
    since = f"since snapshot #{diff['previous']}" if diff["previous"] else "(first snapshot)"
    right.plotly_chart(
        px.bar(
            df,
            x="label",
            y="change",
            color="split",
            barmode="group",
            title=f"Change {since}" + (" (boxes)" if detection else ""),
            category_orders={"label": list(snap.classes)},
            labels={"label": "class"} if detection else None,
        ).update_layout(xaxis_type="category", yaxis_tickformat="+,d"),
        width="stretch",
    )
    st.subheader("Training examples")
    if detection:
        detection_examples(snap, pid)
        return
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


def detection_examples(snap, pid: int) -> None:
    """Training images with a box of the chosen class, every true box drawn (a colour per
    class, as on the other pages)."""
    label = st.selectbox("Examples with a box of class", list(snap.classes))
    with wb.session() as s:
        examples = [
            i
            for i in snapshot_items(
                session=s, snapshot_id=snap.id, split=Split.TRAIN, project_id=pid
            )
            if any(b["label"] == label for b in i.boxes or [])
        ][:8]
    if not examples:
        st.caption(f"No training image has a box of class {label} in this snapshot.")
        return
    cols = st.columns(4)
    for k, item in enumerate(examples):
        n = sum(1 for b in item.boxes if b["label"] == label)
        cols[k % 4].image(
            wb.boxed(item.storage_key, item.boxes, scores=False, classes=list(snap.classes)),
            width="stretch",
            caption=f"{len(item.boxes)} boxes, {n} of class {label}",
        )


wb.guarded(body)

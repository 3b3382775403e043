"""Review queue: the work still to do (answered items have left), in the order of the
configured strategy; confirm or relabel, send to Label Studio, mark as noise."""

import pandas as pd
import streamlit as st

from app import wb
from quarkflow_core import formatting as fmt
from quarkflow_core.database import begin_write
from quarkflow_core.predictions import review_queue
from quarkflow_core.queue import queue_size
from quarkflow_core.review import dismiss_as_noise, project_classes, resolve_item
from quarkflow_core.schema import ReviewState


def queue_table(items: list[dict]) -> None:
    df = pd.DataFrame(items)
    df["image"] = df["storage_key"].map(wb.thumbnail)
    df["reason"] = df["reason"].map(fmt.words)
    df["expert_label"] = df["expert_label"].fillna("")
    df["note"] = df["note"].fillna("")
    df["scored_by"] = df["scored_by"].map(fmt.version)
    df["created_at"] = df["created_at"].map(fmt.as_utc)
    st.dataframe(
        df[
            [
                "id",
                "image",
                "predicted_label",
                "expert_label",
                "confidence",
                "scored_by",
                "reason",
                "state",
                "priority",
                "note",
                "created_at",
            ]
        ],
        hide_index=True,
        row_height=40,
        column_config={
            "id": wb.number_column("item", "#%d"),
            "image": st.column_config.ImageColumn("image", width="small"),
            "predicted_label": st.column_config.TextColumn("predicted"),
            "expert_label": st.column_config.TextColumn(
                "expert says", help="The label an expert gave with a 'wrong' verdict."
            ),
            "confidence": wb.confidence_column("calibrated confidence"),
            "scored_by": st.column_config.TextColumn(
                "scored by", help="The model whose uncertainty sets the priority: the champion."
            ),
            "priority": st.column_config.NumberColumn(
                "priority",
                format="%.2f",
                help="The champion's uncertainty (0-1); 1 and above: people disagree, or "
                "someone said 'wrong' without naming the label.",
            ),
            "note": st.column_config.TextColumn("why", width="medium"),
            "created_at": wb.time_column("queued"),
        },
    )


def suggested(item: dict) -> str | None:
    return item["expert_label"] or item["predicted_label"]


def body() -> None:
    wb.title("Review queue")
    pid = wb.project_id()
    strategy = wb.settings().review_strategy
    with wb.session() as s:
        total, items = review_queue(session=s, limit=100, strategy=strategy, project_id=pid)
        classes = project_classes(session=s, project_id=pid) if items else []
        closed = queue_size(s, (ReviewState.CLOSED,), project_id=pid)
    if not items:
        fixed = wb.settings().review_threshold
        threshold = (
            f"under {fmt.percent(fixed, 0)}, QF_REVIEW_THRESHOLD"
            if fixed is not None
            else "under the serving model's calibrated threshold"
        )
        st.info(
            "The review queue is empty: low-confidence predictions (calibrated confidence "
            f"{threshold}) and 'wrong' verdicts from experts land here. Nothing needs a person "
            "right now; come back after traffic arrives."
        )
        return
    shown = f"; the next {len(items):,} are listed" if total > len(items) else ""
    order = (
        "disputed first, then the champion's most uncertain, class-balanced and spread out"
        if strategy == "diverse"
        else "disputed first, then the champion's most uncertain"
    )
    st.caption(
        f"{total:,} items to do (open, sent to Label Studio or disputed){shown}: {order} "
        f"(QF_REVIEW_STRATEGY={strategy}). Answered items leave the queue; {closed:,} closed "
        "themselves because the champion became sure of them."
    )
    queue_table(items)
    item = st.selectbox(
        "Item",
        items,
        format_func=lambda i: (
            f"#{i['id']}: {i['predicted_label'] or fmt.MISSING} at "
            f"{fmt.percent(i['confidence'])} ({fmt.words(i['reason'])}, {i['state']})"
            + (f", expert says {i['expert_label']}" if i["expert_label"] else "")
        ),
    )
    left, right = st.columns([1, 2])
    left.image(wb.image(item["storage_key"]), width=160)
    left.caption(f"queued {fmt.when(item['created_at'])}")
    with right.form("decide"):
        label = st.selectbox(
            "Label",
            classes,
            index=classes.index(default) if (default := suggested(item)) in classes else 0,
            help="Starts at what an expert said, else at the model's label.",
        )
        c1, c2, c3 = st.columns(3)
        confirm = c1.form_submit_button("Confirm / relabel")
        noise = c2.form_submit_button("Mark as label noise")
        send = c3.form_submit_button("Send to Label Studio")
    if confirm or noise:
        with wb.session() as s:
            begin_write(s)  # SQLite: a read-then-write transaction takes the write lock first
            if confirm:
                resolve_item(
                    session=s,
                    item_id=item["id"],
                    label=label,
                    user=wb.db_user(s),
                    classes=classes,
                    project_id=pid,
                )
            else:
                dismiss_as_noise(session=s, item_id=item["id"], user=wb.db_user(s), project_id=pid)
        st.success("Saved.")
        st.rerun()
    if send:
        from quarkflow_core.orchestration import trigger_deployment

        run = trigger_deployment(
            wb.settings().prefect_api_url,
            name="labelstudio_sync/labelstudio_sync",
            parameters={"project": wb.project()["name"]},
        )
        st.success(
            f"Label Studio sync started on the worker (flow run {run[:8]}); "
            "open items go out as tasks."
        )


wb.guarded(body)

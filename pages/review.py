"""Review queue: prioritised items; confirm or relabel, send to Label Studio, mark as noise."""

import pandas as pd
import streamlit as st

from app import wb
from quarkflow_core.predictions import review_queue
from quarkflow_core.review import dismiss_as_noise, project_classes, resolve_item


def body() -> None:
    st.title("Review queue")
    with wb.session() as s:
        total, items = review_queue(session=s, limit=100)
        classes = project_classes(session=s)
    st.caption(f"{total:,} items open, sent to Label Studio or disputed; most urgent first")
    if not items:
        st.success("The queue is empty.")
        return
    st.dataframe(
        pd.DataFrame(items)[["id", "predicted_label", "confidence", "reason", "state", "priority"]],
        hide_index=True,
    )
    item = st.selectbox(
        "Item",
        items,
        format_func=lambda i: f"#{i['id']} {i['predicted_label']} ({i['reason']}, {i['state']})",
    )
    left, right = st.columns([1, 2])
    left.image(wb.storage().get(item["storage_key"]), width=160)
    with right.form("decide"):
        label = st.selectbox(
            "Label",
            classes,
            index=classes.index(item["predicted_label"])
            if item["predicted_label"] in classes
            else 0,
        )
        c1, c2, c3 = st.columns(3)
        confirm = c1.form_submit_button("Confirm / relabel")
        noise = c2.form_submit_button("Mark as label noise")
        send = c3.form_submit_button("Send to Label Studio")
    if confirm or noise:
        with wb.session() as s:
            if confirm:
                resolve_item(
                    session=s, item_id=item["id"], label=label, user=wb.db_user(s), classes=classes
                )
            else:
                dismiss_as_noise(session=s, item_id=item["id"], user=wb.db_user(s))
            s.commit()
        st.success("Saved.")
        st.rerun()
    if send:
        from quarkflow_core.orchestration import trigger_deployment

        run = trigger_deployment(
            wb.settings().prefect_api_url, name="labelstudio_sync/labelstudio_sync"
        )
        st.success(
            f"Label Studio sync started on the worker (flow run {run[:8]}); "
            "open items go out as tasks."
        )


wb.guarded(body)

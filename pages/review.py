"""Review queue: the work still to do (answered items have left), in the order of the
configured strategy; confirm or relabel, send to Label Studio, mark as noise. A detection
project's items show the image with the model's boxes; their boxes are settled in Label
Studio or by experts' per-box verdicts (no single label to confirm), and the items settled
lately show the model's boxes beside the ones people settled on."""

import pandas as pd
import streamlit as st

from app import wb
from quarkflow_core import formatting as fmt
from quarkflow_core.database import begin_write
from quarkflow_core.detection.draw import shown_summary
from quarkflow_core.predictions import review_queue
from quarkflow_core.queue import queue_size
from quarkflow_core.review import dismiss_as_noise, project_classes, resolve_item
from quarkflow_core.schema import ReviewState


def queue_table(items: list[dict], detection: bool = False) -> None:
    df = pd.DataFrame(items)
    if detection:
        df["image"] = [wb.boxed_thumbnail(i["storage_key"], i.get("boxes")) for i in items]
    else:
        df["image"] = df["storage_key"].map(wb.thumbnail)
    df["reason"] = df["reason"].map(fmt.words)
    df["expert_label"] = df["expert_label"].fillna("")
    df["note"] = df["note"].fillna("")
    df["scored_by"] = df["scored_by"].map(fmt.version)
    df["created_at"] = df["created_at"].map(fmt.as_utc)
    columns = [
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
    if detection:  # no single label: how many boxes, and none "expert says"
        df["predicted_label"] = [shown_summary(i.get("boxes")) for i in items]
        columns.remove("expert_label")
    st.dataframe(
        df[columns],
        hide_index=True,
        row_height=64 if detection else 40,
        column_config={
            "id": wb.number_column("item", "#%d"),
            "image": st.column_config.ImageColumn("image", width="small"),
            "predicted_label": st.column_config.TextColumn(
                "model's boxes" if detection else "predicted"
            ),
            "expert_label": st.column_config.TextColumn(
                "expert says", help="The label an expert gave with a 'wrong' verdict."
            ),
            "confidence": wb.confidence_column(
                "top box's score" if detection else "calibrated confidence"
            ),
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


def uncertain_note(item: dict) -> str:
    """Which of the model's boxes made it uncertain: the logged ones under its threshold."""
    boxes = item.get("boxes") or []
    under = sum(1 for b in boxes if not b.get("shown", True))
    text = f"{shown_summary(boxes)} shown (solid)"
    if under:
        text += f", {under} scored just under the threshold (dashed)"
    return text


def detection_item(item: dict) -> tuple[bool, bool]:
    """A detection item: the image with every box the model logged (the shown ones with their
    label and score), and how its boxes get settled."""
    left, right = st.columns([3, 2])
    left.image(
        wb.boxed(
            item["storage_key"], item.get("boxes"), only_shown=False, min_side=640, label_px=20
        ),
        width="stretch",
        caption=f"item #{item['id']}: {uncertain_note(item)}; "
        f"queued {fmt.when(item['created_at'])}",
    )
    with right:
        st.markdown(
            "**Boxes are settled box by box**, not with one label: send the item to "
            "Label Studio, where annotators correct the model's boxes (rectangles), or an "
            "expert answers the prediction with per-box verdicts (correct, wrong label, box "
            "off, not an object, missed objects: `POST .../predictions/{id}/feedback` or the "
            "demo's box editor). Either settles the item and its boxes train the next model."
        )
        with st.form("decide"):
            c1, c2 = st.columns(2)
            noise = c1.form_submit_button(
                "Mark as label noise", help="Leave this image out of training"
            )
            send = c2.form_submit_button("Send to Label Studio")
    return noise, send


def settled(items: list[dict]) -> None:
    """Detection items settled lately: the model's boxes beside the boxes people settled."""
    done = [i for i in items if i.get("resolved_boxes") is not None]
    if not done:
        return
    st.subheader("Settled lately")
    st.caption(
        "The model's shown boxes (blue, left) beside the boxes people settled on (green, "
        "right): from Label Studio or an expert's per-box verdicts. These train the next model."
    )
    cols = st.columns(2)
    for k, item in enumerate(done[:6]):
        shown = [b for b in item.get("boxes") or [] if b.get("shown", True)]
        cols[k % 2].image(
            wb.compared(
                item["storage_key"],
                shown,
                [{**b, "source": "resolved"} for b in item["resolved_boxes"]],
                ("model", "settled"),
            ),
            width="stretch",
            caption=f"item #{item['id']}: {item['note'] or 'settled'}",
        )


def body() -> None:
    wb.title("Review queue")
    pid = wb.project_id()
    strategy = wb.settings().review_strategy
    detection = wb.is_detection()
    with wb.session() as s:
        total, items = review_queue(session=s, limit=100, strategy=strategy, project_id=pid)
        classes = project_classes(session=s, project_id=pid) if items else []
        closed = queue_size(s, (ReviewState.CLOSED,), project_id=pid)
        done = (
            review_queue(session=s, limit=6, states=(ReviewState.RESOLVED,), project_id=pid)[1]
            if detection
            else []
        )
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
            if not detection
            else "The review queue is empty: detections with a box scored near the model's "
            "threshold and 'wrong' verdicts that do not say which box land here. Nothing "
            "needs a person right now; come back after traffic arrives."
        )
        settled(done)
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
    queue_table(items, detection)
    item = st.selectbox(
        "Item",
        items,
        format_func=lambda i: (
            f"#{i['id']}: "
            + (
                shown_summary(i.get("boxes"))
                if detection
                else f"{i['predicted_label'] or fmt.MISSING} at {fmt.percent(i['confidence'])}"
            )
            + f" ({fmt.words(i['reason'])}, {i['state']})"
            + (f", expert says {i['expert_label']}" if i["expert_label"] else "")
        ),
    )
    if detection:
        noise, send = detection_item(item)
        if noise:
            with wb.session() as s:
                begin_write(s)
                dismiss_as_noise(session=s, item_id=item["id"], user=wb.db_user(s), project_id=pid)
            st.success("Saved.")
            st.rerun()
        if send:
            label_studio_sync()
        settled(done)
        return
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
        label_studio_sync()


def label_studio_sync() -> None:
    """Start the Label Studio sync on the worker (never inside Streamlit)."""
    from quarkflow_core.orchestration import trigger_deployment

    run = trigger_deployment(
        wb.settings().prefect_api_url,
        name="labelstudio_sync/labelstudio_sync",
        parameters={"project": wb.project()["name"]},
    )
    st.success(
        f"Label Studio sync started on the worker (flow run {run[:8]}); open items go out as tasks."
    )


wb.guarded(body)

"""Training runs: status, progress, loss curves, device, duration, errors; start a retrain on
the worker (never trains inside Streamlit)."""

import pandas as pd
import plotly.express as px
import streamlit as st

from app import wb
from quarkflow_core import analytics
from quarkflow_core.schema import Role


def body() -> None:
    st.title("Training runs")
    if wb.has_role(Role.ML_LEAD):
        with st.form("retrain"):
            epochs = st.number_input("Epochs", 1, 200, 15)
            kfold = st.number_input("k-fold (0 = off)", 0, 10, 0)
            go = st.form_submit_button("Start retrain on the worker")
        if go:
            from quarkflow_core.orchestration import trigger_deployment

            run = trigger_deployment(
                wb.settings().prefect_api_url,
                parameters={"epochs": int(epochs), "kfold": int(kfold)},
            )
            st.success(f"retrain started on the worker: flow run {run}")
    with wb.session() as s:
        runs = analytics.training_runs(session=s)
    if not runs:
        st.info("No training run yet.")
        return
    table = pd.DataFrame(runs).drop(columns=["history"])
    st.dataframe(table, hide_index=True)
    run = st.selectbox(
        "Run", runs, format_func=lambda r: f"#{r['id']} {r['architecture']} {r['status']}"
    )
    if run["error"]:
        st.error(run["error"])
    if run["history"]:
        h = pd.DataFrame(run["history"])
        loss = h.melt(
            id_vars="epoch",
            value_vars=[c for c in ("train_loss", "val_loss") if c in h],
            var_name="curve",
            value_name="loss",
        )
        left, right = st.columns(2)
        left.plotly_chart(
            px.line(loss, x="epoch", y="loss", color="curve", markers=True, title="Loss"),
            width="stretch",
        )
        if "val_accuracy" in h:
            right.plotly_chart(
                px.line(h, x="epoch", y="val_accuracy", markers=True, title="Validation accuracy"),
                width="stretch",
            )
        if run["status"] == "running":
            st.progress(
                min(1.0, len(h) / max(1, run["epochs"] or 1)),
                text=f"epoch {len(h)} of {run['epochs']}",
            )


wb.guarded(body)

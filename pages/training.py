"""Training runs: status, progress, loss curves, device, duration, errors; start a retrain on
the worker (never trains inside Streamlit). A detector's runs show validation mAP@0.5 where a
classifier's show accuracy."""

import pandas as pd
import plotly.express as px
import streamlit as st

from app import wb
from quarkflow_core import analytics
from quarkflow_core import formatting as fmt
from quarkflow_core.schema import Role

# a detector's validation mAP@0.5 per epoch: the live progress and the finished history name
# it differently
MAP50_KEYS = ("val_map50",)


def map50_column(history: pd.DataFrame) -> str | None:
    """The history's validation mAP@0.5 column, if it has one with values."""
    return next((k for k in MAP50_KEYS if k in history and history[k].notna().any()), None)


def best_map50(history: list[dict]) -> float | None:
    """The best validation mAP@0.5 over a run's epochs (what early stopping keeps)."""
    values = [h.get(k) for h in history for k in MAP50_KEYS if h.get(k) is not None]
    return max(values) if values else None


def runs_table(runs: list[dict], detection: bool = False) -> None:
    df = pd.DataFrame(runs)
    if detection:
        df["accuracy"] = [best_map50(r["history"]) for r in runs]
    df = df.drop(columns=["history"])
    df["duration"] = df["seconds"].map(fmt.seconds)
    df["error"] = df["error"].fillna("")
    st.dataframe(
        df[
            [
                "id",
                "status",
                "architecture",
                "device",
                "epochs",
                "duration",
                "accuracy",
                "snapshot_id",
                "started_at",
                "error",
            ]
        ],
        hide_index=True,
        column_config={
            "id": wb.number_column("run", "#%d"),
            "epochs": wb.number_column("epochs"),
            "duration": st.column_config.TextColumn("duration", help="finished - started"),
            "accuracy": st.column_config.NumberColumn(
                "best validation mAP@0.5",
                format="%.3f",
                help="The best epoch's mAP@0.5 on the run's validation carve-out; the "
                "hold-out mAP is on Model comparison once the run is registered.",
            )
            if detection
            else wb.confidence_column("hold-out accuracy"),
            "snapshot_id": wb.number_column("snapshot", "#%d"),
            "started_at": wb.time_column("started"),
            "error": st.column_config.TextColumn("error", width="medium"),
        },
    )


def curves(run: dict) -> None:
    h = pd.DataFrame(run["history"])
    loss = h.melt(
        id_vars="epoch",
        value_vars=[c for c in ("train_loss", "val_loss") if c in h and h[c].notna().any()],
        var_name="curve",
        value_name="loss",
    )
    loss["curve"] = loss["curve"].map(fmt.words)
    left, right = st.columns(2)
    left.plotly_chart(
        px.line(loss, x="epoch", y="loss", color="curve", markers=True, title="Loss").update_layout(
            xaxis_dtick=1
        ),
        width="stretch",
    )
    map50 = map50_column(h)
    if map50 is not None:
        right.plotly_chart(
            px.line(
                h,
                x="epoch",
                y=map50,
                markers=True,
                title="Validation mAP@0.5",
                labels={map50: "validation mAP@0.5"},
            ).update_layout(yaxis_tickformat=".2f", yaxis_rangemode="tozero", xaxis_dtick=1),
            width="stretch",
        )
    elif "val_accuracy" in h:
        right.plotly_chart(
            px.line(
                h,
                x="epoch",
                y="val_accuracy",
                markers=True,
                title="Validation accuracy",
                labels={"val_accuracy": "validation accuracy"},
            ).update_layout(yaxis_tickformat=".0%", xaxis_dtick=1),
            width="stretch",
        )
    if run["status"] == "running":
        st.progress(
            min(1.0, len(h) / max(1, run["epochs"] or 1)),
            text=f"epoch {len(h)} of {run['epochs']}",
        )


REFRESH_S = 5  # the runs table and curves follow a retrain on the worker


def body() -> None:
    wb.title("Training runs")
    project = wb.project()
    lead = wb.can(Role.ML_LEAD)
    detection = wb.is_detection()
    if lead:
        # Enter does not submit: a number typed and confirmed must not start a second run
        with st.form("retrain", enter_to_submit=False):
            if detection:  # the default detector's recipe; k-fold is for classifiers
                from quarkflow_core.detection.models import detector_spec
                from quarkflow_core.detection.train import DEFAULT_DETECTOR

                recipe = detector_spec(DEFAULT_DETECTOR)
                epochs = st.number_input(
                    "Epochs",
                    1,
                    200,
                    recipe.epochs,
                    help=f"{recipe.name}: {recipe.description}. Early stopping on validation "
                    "mAP@0.5 may end sooner.",
                )
                kfold, quantize = 0, False
            else:
                epochs = st.number_input("Epochs", 1, 200, 15)
                kfold = st.number_input("k-fold (0 = off)", 0, 10, 0)
                quantize = st.checkbox(
                    "INT8 variant as the candidate",
                    help="ONNX Runtime static quantization of the trained model, registered "
                    "as the candidate with its fp32 source as its parent; refused (the fp32 "
                    "model stays the candidate) when it loses more than 0.5 points of "
                    "hold-out accuracy.",
                )
            go = st.form_submit_button("Start retrain on the worker")
        if go:
            from quarkflow_core.orchestration import start_retrain

            # the user is read in a transaction of its own: on SQLite a write transaction
            # must start with its write (database.begin_write)
            with wb.session() as s:
                actor = wb.db_user(s)
            with wb.session() as s:
                run = start_retrain(
                    session=s,
                    actor=actor,
                    api_url=wb.settings().prefect_api_url,
                    parameters={"epochs": int(epochs)}
                    if detection
                    else {"epochs": int(epochs), "kfold": int(kfold)}
                    | ({"quantize": True} if quantize else {}),
                    project_id=project["id"],
                )
            st.success(
                f"retrain started on the worker: flow run {run}. It appears below within "
                "seconds and registers a challenger when it finishes."
            )
    runs_view(lead, int(project["id"]), detection)


@st.fragment(run_every=REFRESH_S)
def runs_view(lead: bool, pid: int, detection: bool = False) -> None:
    """Re-read every few seconds, so a run started on the worker shows up and its curves
    grow without a reload (the project's runs only)."""
    with wb.session() as s:
        runs = analytics.training_runs(session=s, project_id=pid)
    if not runs:
        st.info(
            "No training run yet: ML leads start one with the form above (the worker, "
            "`quarkflow worker`, runs it)."
            if lead
            else "No training run yet: an ML lead starts one from this page, or on a machine "
            f"with the data: `{wb.command('train --out DIR')}`."
        )
        return
    runs_table(runs, detection)
    by_id = {r["id"]: r for r in runs}
    pick = st.selectbox(
        "Run",
        list(by_id),
        format_func=lambda i: (
            f"#{i} {by_id[i]['architecture']}: {by_id[i]['status']}, "
            f"started {fmt.relative(by_id[i]['started_at'])}"
        ),
        key="training-run",
    )
    run = by_id[pick]
    if run["error"]:
        st.error(run["error"])
    if run["history"]:
        curves(run)
    else:
        st.caption("No epoch finished yet: the curves appear after the first one.")


wb.guarded(body)

"""Loop simulator: label-efficiency curves from `quarkflow simulate-loop` (and `make bench`):
how many answered labels each review strategy needs on this kind of data."""

from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from app import wb
from quarkflow_core import formatting as fmt
from quarkflow_core.simulate import curve_bands, curve_rows, load_results

ROOT = Path(__file__).resolve().parents[1]
COLORS = {"random": "#9e9e9e", "uncertainty": "#1f77b4", "diverse": "#d62728"}


def accuracy_plot(result: dict) -> go.Figure:
    fig = go.Figure()
    bands = pd.DataFrame(curve_bands(result))
    for strategy, df in bands.groupby("strategy", sort=False):
        color = COLORS.get(strategy, "#2ca02c")
        fig.add_trace(
            go.Scatter(
                x=list(df["answered"]) + list(df["answered"])[::-1],
                y=list(df["max"]) + list(df["min"])[::-1],
                fill="toself",
                mode="lines",
                fillcolor=color,
                opacity=0.15,
                line={"width": 0},
                hoverinfo="skip",
                showlegend=False,
            )
        )
        fig.add_trace(
            go.Scatter(
                x=df["answered"],
                y=df["mean"],
                mode="lines+markers",
                name=strategy,
                line={"color": color},
                customdata=df[["min", "max", "seeds"]],
                hovertemplate="%{x} answered: %{y:.1%} (range %{customdata[0]:.1%}-"
                "%{customdata[1]:.1%} over %{customdata[2]} seeds)<extra>" + strategy + "</extra>",
            )
        )
    target = result["summary"]["target_accuracy"]
    fig.add_hline(
        y=target,
        line_dash="dot",
        annotation_text=f"target: {result['summary']['target_from']}'s final {target:.1%}",
    )
    return fig.update_layout(
        title="Champion accuracy on the test set vs answered labels (band: range over seeds)",
        xaxis_title="answered labels",
        yaxis_title="test accuracy",
        yaxis_tickformat=".0%",
        legend_title="strategy",
    )


def errors_plot(result: dict) -> go.Figure:
    rows = pd.DataFrame(curve_rows(result))
    rows = rows[rows["round"] > 0]
    per = result["spec"]["per_round"]
    mean = rows.groupby(["strategy", "round"], sort=False)["errors_in_answers"].mean().reset_index()
    fig = go.Figure(
        [
            go.Bar(
                x=df["round"],
                y=df["errors_in_answers"] / per,
                name=strategy,
                marker_color=COLORS.get(strategy, "#2ca02c"),
            )
            for strategy, df in mean.groupby("strategy", sort=False)
        ]
    )
    return fig.update_layout(
        title="Share of the asked images the champion had wrong (mean over seeds)",
        xaxis_title="round",
        yaxis_title="model errors among the answers",
        yaxis_tickformat=".0%",
        barmode="group",
        xaxis_dtick=1,
    )


def summary_metrics(result: dict) -> None:
    strategies = result["summary"]["strategies"]
    cols = st.columns(len(strategies))
    for col, (name, st_) in zip(cols, strategies.items(), strict=True):
        reach = st_["answered_to_target"]
        final = st_["final_accuracy"]
        col.metric(
            f"{name}: answered labels to the target",
            "not reached" if reach["mean"] is None else fmt.number(reach["mean"]),
            help=f"reached in {reach['reached']} seeds"
            + ("" if reach["mean"] is None else f"; range {reach['min']}-{reach['max']}"),
        )
        col.caption(
            f"reached in {reach['reached']} seeds; final accuracy {fmt.percent(final['mean'])} "
            f"(range {fmt.percent(final['min'])}-{fmt.percent(final['max'])})"
        )


def body() -> None:
    st.title("Loop simulator")
    own = load_results([Path(wb.settings().data_dir) / "simulations"])
    bench = load_results([ROOT / "bench" / "results"])
    if not own:
        st.info(
            "No simulation of yours yet. Run one on your own labelled images (one sub-folder "
            "per class) or on the demo digits; it uses a temporary workspace and leaves this "
            "deployment alone:\n\n`quarkflow simulate-loop --folder path/to/labelled "
            "--rounds 5 --per-round 50 --strategy random --strategy diverse --seeds 0,1,2`"
            + ("\n\nBelow: the benchmark's run on the demo digits (`make bench`)." if bench else "")
        )
    results = own + bench
    if not results:
        return
    pick = st.selectbox(
        "Result",
        range(len(results)),
        format_func=lambda i: (
            f"{results[i][1]['data']['name']}: {', '.join(results[i][1]['spec']['strategies'])}"
            f" - {fmt.when(results[i][1]['created_at'])} ({results[i][0].name})"
        ),
        key="simulation",
    )
    path, result = results[pick]
    spec = result["spec"]
    st.caption(
        f"{spec['seed_size']} seed labels, a pool of {spec['pool_size']:,} unlabelled images, "
        f"{spec['rounds']} rounds of {spec['per_round']} answers, seeds {spec['seeds']}; each "
        f"champion scored on {spec['test_size']:,} test images the loop never sees. "
        f"{fmt.seconds(result['seconds'])} in all. File: `{path}`"
    )
    summary_metrics(result)
    st.plotly_chart(accuracy_plot(result), width="stretch")
    st.plotly_chart(errors_plot(result), width="stretch")
    with st.expander("Every round"):
        st.dataframe(pd.DataFrame(curve_rows(result)), hide_index=True)


wb.guarded(body)

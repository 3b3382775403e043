"""Overview / monitoring: traffic, latency, live accuracy, confidence, drift, queue depth."""

import pandas as pd
import plotly.express as px
import streamlit as st

from app import wb
from quarkflow_core import analytics


def body() -> None:
    st.title("Overview")
    with wb.session() as s:
        f = wb.filters(s, key="overview")
        bucket = st.sidebar.radio("Time buckets", ["hour", "day"], horizontal=True)
        ov = analytics.overview(session=s, filters=f, bucket=bucket)
        hist = analytics.confidence_histogram(session=s, filters=f, bucket=bucket)
        dr = analytics.drift(session=s, filters=f)
    lat = ov["latency_ms"]
    acc = ov["live_accuracy"]
    queue = ov["review_queue"]
    cols = st.columns(6)
    cols[0].metric("Predictions", f"{ov['predictions']:,}")
    cols[1].metric("Feedback", f"{ov['feedback']:,}")
    cols[2].metric("Live accuracy", "–" if acc is None else f"{acc:.1%}")
    cols[3].metric(
        "Latency p50 / p95 (ms)",
        "–" if lat["p50"] is None else f"{lat['p50']:.0f} / {lat['p95']:.0f}",
    )
    cols[4].metric("Latency p99", "–" if lat["p99"] is None else f"{lat['p99']:.1f} ms")
    cols[5].metric(
        f"Review queue ({queue['disputed']} disputed)",
        f"{queue['open'] + queue['sent'] + queue['disputed']:,}",
    )
    api = analytics.api_request_counts(wb.settings().api_url)
    if api is None:
        st.caption("Request outcomes: the API's /metrics is not reachable (QF_API_URL).")
    else:
        st.caption(
            f"API requests since it started: {api['success']:,} succeeded, "
            f"{api['client_error']:,} refused (4xx: bad uploads, auth), "
            f"{api['server_error']:,} failed (5xx)"
        )
    if not ov["series"]:
        st.info("No predictions in this range yet: send some through the demo (/demo) or the API.")
        return
    series = pd.DataFrame(ov["series"])
    left, right = st.columns(2)
    left.plotly_chart(
        px.bar(series, x="bucket", y="predictions", title="Predictions (throughput)"),
        width="stretch",
    )
    right.plotly_chart(
        px.line(series, x="bucket", y="mean_latency_ms", markers=True, title="Mean latency (ms)"),
        width="stretch",
    )
    left, right = st.columns(2)
    if ov["accuracy_series"]:
        accs = pd.DataFrame(ov["accuracy_series"])
        left.plotly_chart(
            px.line(
                accs,
                x="bucket",
                y="accuracy",
                markers=True,
                title="Live accuracy from feedback",
                range_y=[0, 1],
            ),
            width="stretch",
        )
    else:
        left.info("No feedback in this range: live accuracy needs experts' verdicts.")
    if hist:
        h = pd.DataFrame(hist)
        right.plotly_chart(
            px.density_heatmap(
                h,
                x="bucket",
                y="bin",
                z="count",
                histfunc="sum",
                nbinsy=10,
                title="Confidence distribution over time",
            ),
            width="stretch",
        )
    if dr["version"] is not None:
        d = pd.DataFrame(
            {
                "class": dr["classes"],
                "training snapshot": list(dr["train"].values()),
                "predicted": list(dr["live"].values()),
            }
        )
        d = d.melt(id_vars="class", var_name="source", value_name="count")
        d["share"] = d["count"] / d.groupby("source")["count"].transform("sum").clip(lower=1)
        psi = "–" if dr["psi"] is None else f"{dr['psi']:.3f}"
        js = "–" if dr["js_distance"] is None else f"{dr['js_distance']:.3f}"
        st.plotly_chart(
            px.bar(
                d,
                x="class",
                y="share",
                color="source",
                barmode="group",
                title=f"Predicted classes vs v{dr['version']}'s training data: "
                f"PSI {psi}, Jensen-Shannon {js}",
            ),
            width="stretch",
        )
        st.caption(
            "PSI above 0.2 usually means the traffic no longer looks like the training data."
        )


wb.guarded(body)

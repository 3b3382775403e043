"""Overview / monitoring: traffic, latency, live accuracy, confidence, drift, queue depth. In a
detection project "correct" accepts every shown box, a prediction's confidence is its top
box's score, and class drift (per image here, per box in the training data) is left out."""

import pandas as pd
import plotly.express as px
import streamlit as st

from app import wb
from quarkflow_core import analytics
from quarkflow_core import formatting as fmt
from quarkflow_core.detection.seed import box_summary


def metrics(ov: dict, detection: bool = False) -> None:
    lat = ov["latency_ms"]
    queue = ov["review_queue"]
    cols = st.columns(7)
    cols[0].metric("Predictions", fmt.number(ov["predictions"]))
    cols[1].metric("Feedback", fmt.number(ov["feedback"]))
    cols[2].metric(
        "Accepted as is" if detection else "Live accuracy",
        fmt.percent(ov["live_accuracy"]),
        help="Share of expert verdicts that accepted every shown box ('correct') in this "
        "range; the others corrected boxes one by one."
        if detection
        else "Share of expert verdicts that said 'correct' in this range.",
    )
    for col, q in zip(cols[3:6], ("p50", "p95", "p99"), strict=True):
        col.metric(f"Latency {q}", fmt.ms(lat[q]), help="Model latency per image, in the API.")
    cols[6].metric(
        "Review queue",
        fmt.number(queue["open"] + queue["sent"] + queue["disputed"]),
        delta=f"{queue['disputed']:,} disputed",
        delta_color="off",
        delta_arrow="off",
        help="Open, sent to Label Studio or disputed (an expert said 'wrong').",
    )


def serving(url: str | None) -> None:
    """What the API serves in this project, on which backend and device (its /readyz)."""
    served = analytics.api_serving(url, wb.project()["name"])
    if served is None:
        return
    if not served.get("ok"):
        st.caption(f"Serving: nothing in this project ({served.get('error', 'no model loaded')})")
        return
    line = f"Serving v{served['version']} on **{served['backend']}** ({served['device']})"
    if served.get("fallback"):
        st.warning(
            f"{line}: not the backend asked for. {served.get('backend_note', '')}",
            icon=":material/memory:",
        )
    else:
        st.caption(f"{line}: {served.get('backend_note', '')}")


def request_outcomes() -> None:
    url = wb.settings().api_url
    serving(url)
    api = analytics.api_request_counts(url)
    if api is None:
        st.caption(
            f"Request outcomes: the API's /metrics is not reachable at {url or '(unset)'}; "
            "start it with `quarkflow serve` or point QF_API_URL at it."
        )
    else:
        box = api["outbox"]
        dead = int(box.get("dead_letters", 0))
        if dead:
            st.error(
                f"{dead:,} acknowledged record(s) in the API's dead letters: the database kept "
                "refusing them. Inspect with `quarkflow outbox list`; after fixing the cause, "
                "`quarkflow outbox replay` (or `quarkflow outbox discard ID --reason ...`).",
                icon=":material/report:",
            )
        if box.get("outage"):
            st.warning(
                f"The API cannot write to the database or storage: "
                f"{int(box.get('depth', 0)):,} acknowledged record(s) are waiting safely in its "
                f"outbox (oldest {fmt.seconds(box.get('oldest_s') or 0)} old); they flush by "
                "themselves once it is back.",
                icon=":material/cloud_off:",
            )
        st.caption(
            f"API requests since it started: {api['success']:,} succeeded, "
            f"{api['client_error']:,} refused (4xx: bad uploads, auth), "
            f"{api['server_error']:,} failed (5xx)"
        )


STEP = {"hour": pd.Timedelta(hours=1), "day": pd.Timedelta(days=1)}


def by_time(rows: list[dict]) -> pd.DataFrame:
    """Rows keyed by a time-bucket label, with the bucket as a datetime for a date axis."""
    df = pd.DataFrame(rows)
    df["bucket"] = pd.to_datetime(df["bucket"])
    return df


def time_axis(fig, buckets: pd.Series, bucket: str):
    """Readable ticks and half a bucket of margin either side, so a single bucket is drawn
    as a bucket, not as a zoom into milliseconds."""
    pad = STEP[bucket] / 2
    return fig.update_xaxes(
        type="date",
        range=[buckets.min() - pad, buckets.max() + pad],
        tickformat="%d %b, %H:%M" if bucket == "hour" else "%d %b %Y",
        title="time (UTC)",
    )


def traffic(series: pd.DataFrame, bucket: str) -> None:
    width_ms = 0.8 * STEP[bucket].total_seconds() * 1000
    left, right = st.columns(2)
    bars = px.bar(series, x="bucket", y="predictions", title="Predictions (throughput)")
    bars.update_traces(width=width_ms, hovertemplate="%{x}<br>%{y:,d} predictions<extra></extra>")
    left.plotly_chart(
        time_axis(bars, series["bucket"], bucket).update_layout(yaxis_tickformat=",d"),
        width="stretch",
    )
    line = px.line(
        series,
        x="bucket",
        y="mean_latency_ms",
        markers=True,
        title="Mean latency",
        labels={"mean_latency_ms": "latency (ms)"},
    )
    line.update_traces(hovertemplate="%{x}<br>%{y:.1f} ms<extra></extra>")
    right.plotly_chart(time_axis(line, series["bucket"], bucket), width="stretch")


def live_accuracy(rows: list[dict], bucket: str, detection: bool = False) -> None:
    accs = by_time(rows)
    fig = px.line(
        accs,
        x="bucket",
        y="accuracy",
        markers=True,
        title="Detections accepted as is (from feedback)"
        if detection
        else "Live accuracy from feedback",
        labels={"accuracy": "accepted as is"} if detection else None,
        range_y=[0, 1.05],
        custom_data=["feedback"],
    )
    fig.update_traces(
        hovertemplate="%{x}<br>%{y:.1%} of %{customdata[0]:,d} verdicts<extra></extra>"
    )
    st.plotly_chart(
        time_axis(fig, accs["bucket"], bucket).update_layout(yaxis_tickformat=".0%"),
        width="stretch",
    )


def confidence(hist: list[dict], bucket: str, detection: bool = False) -> None:
    h = by_time(hist)
    h["bin"] += 0.05  # the bin's centre: its lower edge may fall a rounding error short
    step_ms = STEP[bucket].total_seconds() * 1000
    fig = px.density_heatmap(
        h,
        x="bucket",
        y="bin",
        z="count",
        histfunc="sum",
        title="Top box's score over time" if detection else "Confidence distribution over time",
        labels={"bin": "top box's score" if detection else "confidence", "count": "predictions"},
    )
    start = h["bucket"].min() - STEP[bucket] / 2
    fig.update_traces(
        xbins={"start": start, "end": h["bucket"].max() + STEP[bucket] / 2, "size": step_ms},
        ybins={"start": 0.0, "end": 1.0, "size": 0.1},
        hovertemplate="%{x}<br>confidence %{y:.0%}<br>%{z:,d} predictions<extra></extra>",
    )
    fig.update_layout(
        yaxis={"tickformat": ".0%", "range": [0, 1]}, coloraxis_colorbar_title="predictions"
    )
    st.plotly_chart(time_axis(fig, h["bucket"], bucket), width="stretch")


def drift(dr: dict) -> None:
    d = pd.DataFrame(
        {
            "class": dr["classes"],
            "training snapshot": list(dr["train"].values()),
            "predicted": list(dr["live"].values()),
        }
    )
    d = d.melt(id_vars="class", var_name="source", value_name="count")
    d["share"] = d["count"] / d.groupby("source")["count"].transform("sum").clip(lower=1)
    psi = fmt.MISSING if dr["psi"] is None else f"{dr['psi']:.3f}"
    js = fmt.MISSING if dr["js_distance"] is None else f"{dr['js_distance']:.3f}"
    fig = px.bar(
        d,
        x="class",
        y="share",
        color="source",
        barmode="group",
        hover_data={"count": ":,d", "share": ":.1%"},
        title=f"Predicted classes vs {fmt.version(dr['version'])}'s training data: "
        f"PSI {psi}, Jensen-Shannon {js}",
    )
    st.plotly_chart(
        fig.update_layout(yaxis_tickformat=".0%", xaxis_type="category"), width="stretch"
    )
    st.caption("PSI above 0.2 usually means the traffic no longer looks like the training data.")


def body() -> None:
    wb.title("Overview")
    pid = wb.project_id()
    with wb.session() as s:
        f = wb.filters(s, key="overview")
        bucket = st.sidebar.radio("Time buckets", ["hour", "day"], horizontal=True)
        ov = analytics.overview(session=s, filters=f, bucket=bucket, project_id=pid)
        hist = analytics.confidence_histogram(session=s, filters=f, bucket=bucket, project_id=pid)
        dr = analytics.drift(session=s, filters=f, project_id=pid)
        verdicts = analytics.recent_feedback(session=s, filters=f, project_id=pid)
        # nothing in range: is there anything at all? (decides what the hint says)
        ever = ov["predictions"] or analytics.count_predictions(
            session=s, filters=analytics.Filters(), project_id=pid
        )
    detection = wb.is_detection()
    metrics(ov, detection)
    request_outcomes()
    if not ov["series"]:
        st.info(wb.no_predictions_hint(ever))
        return
    traffic(by_time(ov["series"]), bucket)
    left, right = st.columns(2)
    with left:
        if ov["accuracy_series"]:
            live_accuracy(ov["accuracy_series"], bucket, detection)
        else:
            st.info(
                "No feedback in this range: live accuracy needs experts' verdicts. They give "
                "them with the demo's Correct / Wrong buttons or "
                "`POST /api/v1/predictions/{id}/feedback`."
            )
    if hist:
        with right:
            confidence(hist, bucket, detection)
    if detection:
        st.caption(
            "Class drift is not drawn for a detection project: traffic is logged per image "
            "(its top box's class), the training data per box, so the two do not compare."
        )
    elif dr["version"] is not None:
        drift(dr)
    latest_verdicts(verdicts, detection)


def latest_verdicts(rows: list[dict], detection: bool = False) -> None:
    st.subheader("Latest verdicts")
    if not rows:
        st.caption(
            "No verdicts in this range yet: experts give them with the demo's Correct / Wrong "
            "buttons."
        )
        return
    lines = []
    for r in rows:
        if detection:
            top = (
                f"top box **{r['predicted']}**"
                if r["predicted"] != box_summary([])
                else "the model showed no box"
            )
            said = (
                f":green[correct]: every box accepted ({top})"
                if r["verdict"] == "correct"
                else f":red[wrong]: boxes corrected ({top})"
            )
        else:
            said = (
                f":green[correct]: **{r['predicted']}**"
                if r["verdict"] == "correct"
                else f":red[wrong]: the model said **{r['predicted']}**, "
                f"it is **{r['true_label']}**"
            )
        who = r["user"] or "anonymous (demo)"
        lines.append(
            f"- {said} · {fmt.version(r['model_version'])} · {who}, {fmt.relative(r['created_at'])}"
        )
    st.markdown("\n".join(lines))
    st.caption("Open one on the Predictions page; 'wrong' verdicts wait in the Review queue.")


wb.guarded(body)

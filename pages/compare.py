"""Model comparison: any two versions on the same hold-out."""

import numpy as np
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
import streamlit as st

from app import wb
from quarkflow_core import formatting as fmt
from quarkflow_core import registry
from quarkflow_core.ml.compare import power_statement


def next_version() -> str:
    """How to get another version, with the CLI commands for the current project."""
    return (
        f"an ML lead starts a retrain on Training runs, or run `{wb.command('train --out DIR')}`"
        f" then `{wb.command('models register DIR --challenger')}`"
    )


def metric_table(rep: dict, a: int, b: int) -> None:
    """Accuracy, ECE, size and latency of both, each in its unit, with B - A."""
    lo, hi = rep["accuracy_delta_ci95"]
    labels = {
        "accuracy": "accuracy",
        "ece": "ECE (calibration error)",
        "size_bytes": "size",
        "latency_ms": "latency (median, batch 1, measured for this comparison)",
    }
    rows = [
        ("accuracy", rep["accuracy_a"], rep["accuracy_b"], rep["accuracy_delta"]),
        ("ece", rep["ece_a"], rep["ece_b"], rep["ece_delta"]),
        *[(k, rep["meta_a"].get(k), rep["meta_b"].get(k), d) for k, d in rep["deltas"].items()],
    ]
    st.dataframe(
        pd.DataFrame(
            [
                {
                    "metric": labels.get(key, key),
                    fmt.version(a): fmt.metric(key, va),
                    fmt.version(b): fmt.metric(key, vb),
                    "B - A": fmt.metric_delta(key, d),
                    "95% CI": f"{fmt.points(lo, 2)} to {fmt.points(hi, 2)}"
                    if key == "accuracy"
                    else "",
                }
                for key, va, vb, d in rows
            ]
        ),
        hide_index=True,
    )


def body() -> None:
    wb.title("Model comparison")
    pid = wb.project_id()
    with wb.session() as s:
        versions = registry.list_versions(session=s, project_id=pid)
        if len(versions) < 2:
            have = (
                f"Only {fmt.version(versions[0].version)} is registered"
                if versions
                else "No model version is registered yet"
            )
            st.info(f"{have}: a comparison needs two. To get another, {next_version()}.")
            return
        names = {v.version: v for v in versions}
        named = {a: v.version for a, v in registry.aliases(session=s, project_id=pid).items()}
        default_a = named.get("champion", versions[0].version)
        others = [v.version for v in versions if v.version != default_a]
        default_b = named.get("challenger", others[-1])  # never A itself: nothing to compare
        c1, c2 = st.columns(2)
        a = c1.selectbox(
            "A (reference)",
            list(names),
            index=list(names).index(default_a),
            format_func=lambda n: f"v{n}",
        )
        b = c2.selectbox(
            "B (candidate)",
            list(names),
            index=list(names).index(default_b),
            format_func=lambda n: f"v{n}",
        )
        if a == b:
            st.warning("Pick two different versions.")
            return
        with st.spinner("scoring both on the hold-out (cached after the first time)…"):
            rep = registry.compare_versions(
                session=s,
                storage=wb.storage(),
                a=names[a],
                b=names[b],
                cache_root=registry.model_cache_dir(),
                project_id=pid,
            )
        variants = [registry.summary(v, session=s) for v in versions]
    verdict = rep["verdict"]
    st.subheader(
        f"v{b} vs v{a}: {verdict} (McNemar p = {rep['mcnemar']['p_value']:.3g}, "
        f"n = {rep['n']:,} hold-out images of snapshot #{rep['snapshot_id']})"
    )
    st.caption(f"What this hold-out can show: {power_statement(rep['power'])}.")
    metric_table(rep, a, b)
    per = pd.DataFrame(
        [
            {"class": c, "recall delta": m["recall_delta"], "F1 delta": m["f1_delta"]}
            for c, m in rep["per_class"].items()
        ]
    )
    st.plotly_chart(
        px.bar(
            per.melt(id_vars="class"),
            x="class",
            y="value",
            color="variable",
            barmode="group",
            title="Per-class deltas (B - A)",
            labels={"value": "change", "variable": ""},
        )
        .update_traces(hovertemplate="class %{x}: %{y:+.1%}<extra></extra>")
        .update_layout(xaxis_type="category", yaxis_tickformat="+.0%"),
        width="stretch",
    )
    ca, cb = np.array(rep["confusion_a"]), np.array(rep["confusion_b"])
    classes = list(rep["per_class"])
    cols = st.columns(3)
    for col, mat, title in (
        (cols[0], ca, f"v{a} confusion"),
        (cols[1], cb, f"v{b} confusion"),
        (cols[2], cb - ca, "difference (B - A)"),
    ):
        col.plotly_chart(
            px.imshow(
                mat,
                x=classes,
                y=classes,
                text_auto=True,
                title=title,
                labels={"x": "predicted", "y": "true"},
                color_continuous_scale="RdBu" if "difference" in title else "Blues",
            ).update_layout(xaxis_type="category", yaxis_type="category"),
            width="stretch",
        )
    rel = go.Figure()
    for key, name in (("reliability_a", f"v{a}"), ("reliability_b", f"v{b}")):
        bins = [pt for pt in rep[key] if pt["count"]]
        rel.add_trace(
            go.Scatter(
                x=[pt["confidence"] for pt in bins],
                y=[pt["accuracy"] for pt in bins],
                mode="lines+markers",
                name=name,
            )
        )
    rel.add_trace(
        go.Scatter(x=[0, 1], y=[0, 1], mode="lines", name="perfect", line={"dash": "dot"})
    )
    left, right = st.columns(2)
    left.plotly_chart(
        rel.update_layout(
            title="Reliability diagram",
            xaxis_title="confidence",
            yaxis_title="accuracy",
            xaxis_tickformat=".0%",
            yaxis_tickformat=".0%",
        ),
        width="stretch",
    )
    trade = pd.DataFrame(
        [
            {
                "version": f"v{v['version']}",
                "accuracy": v["metrics"].get("accuracy"),
                "latency_ms": v["metrics"].get("latency_ms_batch1"),
                "size_mb": v["size_bytes"] / 1e6,
                "size": fmt.size(v["size_bytes"]),
                "variant": "pruned" if v["parent_version"] is not None else "trained",
            }
            for v in variants
        ]
    )
    right.plotly_chart(
        px.scatter(
            trade,
            x="latency_ms",
            y="accuracy",
            size="size_mb",
            color="variant",
            text="version",
            hover_data={"size": True, "size_mb": False, "accuracy": ":.2%"},
            labels={"latency_ms": "latency at training time (ms, batch 1)"},
            title="Size / latency / accuracy (all versions, pruned variants marked)",
        )
        .update_traces(textposition="top center")
        .update_layout(yaxis_tickformat=".0%"),
        width="stretch",
    )
    dis = rep["disagreements"][:12]
    n_dis = len(rep["disagreements"])
    st.caption(
        f"{n_dis:,} hold-out images where the two disagree"
        + (f" (the first {len(dis)} below)" if n_dis > len(dis) else "")
    )
    if dis:
        from quarkflow_core.images import get_image_by_sha

        with wb.session() as s:
            keys = [
                get_image_by_sha(
                    session=s, sha256=rep["holdout_image_sha256"][i], project_id=pid
                ).storage_key
                for i in dis
            ]
        cols = st.columns(12)
        for col, key in zip(cols, keys, strict=False):
            col.image(wb.image(key), width=56)


wb.guarded(body)

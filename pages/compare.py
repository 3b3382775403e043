"""Model comparison: any two versions on the same hold-out."""

import numpy as np
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
import streamlit as st

from app import wb
from quarkflow_core import registry


def body() -> None:
    st.title("Model comparison")
    with wb.session() as s:
        versions = registry.list_versions(session=s)
        if len(versions) < 2:
            st.info("Register at least two versions to compare them.")
            return
        names = {v.version: v for v in versions}
        named = {a: v.version for a, v in registry.aliases(session=s).items()}
        default_a = named.get("champion", versions[0].version)
        default_b = named.get("challenger", versions[-1].version)
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
                cache_root=wb.settings().data_dir / "model-cache",
            )
        variants = [registry.summary(v, session=s) for v in versions]
    lo, hi = rep["accuracy_delta_ci95"]
    verdict = rep["verdict"]
    st.subheader(
        f"v{b} vs v{a}: {verdict} (McNemar p = {rep['mcnemar']['p_value']:.3g}, n = {rep['n']})"
    )
    st.dataframe(
        pd.DataFrame(
            [
                {
                    "metric": "accuracy",
                    f"v{a}": rep["accuracy_a"],
                    f"v{b}": rep["accuracy_b"],
                    "delta": rep["accuracy_delta"],
                    "95% CI": f"[{lo:+.4f}, {hi:+.4f}]",
                },
                {
                    "metric": "ECE",
                    f"v{a}": rep["ece_a"],
                    f"v{b}": rep["ece_b"],
                    "delta": rep["ece_delta"],
                    "95% CI": "",
                },
                *[
                    {
                        "metric": k,
                        f"v{a}": rep["meta_a"].get(k),
                        f"v{b}": rep["meta_b"].get(k),
                        "delta": v,
                        "95% CI": "",
                    }
                    for k, v in rep["deltas"].items()
                ],
            ]
        ),
        hide_index=True,
    )
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
        ),
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
            ),
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
            title="Reliability diagram", xaxis_title="confidence", yaxis_title="accuracy"
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
                "pruned": v["parent_version"] is not None,
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
            color="pruned",
            text="version",
            title="Size / latency / accuracy (all versions, pruned variants marked)",
        ),
        width="stretch",
    )
    dis = rep["disagreements"][:12]
    st.caption(f"{len(rep['disagreements'])} hold-out images where the two disagree")
    if dis:
        from quarkflow_core.images import get_image_by_sha

        with wb.session() as s:
            keys = [
                get_image_by_sha(session=s, sha256=rep["holdout_image_sha256"][i]).storage_key
                for i in dis
            ]
        cols = st.columns(12)
        for col, key in zip(cols, keys, strict=False):
            col.image(wb.storage().get(key), width=56)


wb.guarded(body)

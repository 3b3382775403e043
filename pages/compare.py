"""Model comparison: any two versions on the same hold-out. Classifiers: accuracy, McNemar,
per-class deltas, confusion and reliability, and an INT8 variant's evidence against its fp32
source. Detectors: mAP side by side with the paired
bootstrap CI of the difference, AP per class, precision-recall curves, the policy's checks
and the hold-out images the two disagree on most, with both versions' boxes drawn."""

import numpy as np
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
import streamlit as st

from app import wb
from quarkflow_core import formatting as fmt
from quarkflow_core import registry
from quarkflow_core.datasets import snapshot_items
from quarkflow_core.ml.compare import power_statement
from quarkflow_core.schema import Split

# the detection report's side-by-side metrics shown as bars, in order
MAP_BARS = {
    "map": "mAP",
    "map_50": "mAP@0.5",
    "map_75": "mAP@0.75",
    "map_small": "small",
    "map_medium": "medium",
    "map_large": "large",
}
COLOURS = {"A": "#1f77b4", "B": "#ff7f0e"}  # draw.SOURCE_COLOURS' a and b: charts match boxes


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


def tradeoff(
    variants: list[dict], key: str, name: str, hover: str, axis: str, title: str | None = None
):
    """Every version's size, latency and ``key`` (its headline metric) in one scatter."""
    trade = pd.DataFrame(
        [
            {
                "version": f"v{v['version']}",
                key: v["metrics"].get(key),
                "latency_ms": v["metrics"].get("latency_ms_batch1"),
                "size_mb": v["size_bytes"] / 1e6,
                "size": fmt.size(v["size_bytes"]),
                "variant": v.get("variant")
                or ("pruned" if v["parent_version"] is not None else "trained"),
            }
            for v in variants
        ]
    )
    return (
        px.scatter(
            trade,
            x="latency_ms",
            y=key,
            size="size_mb",
            color="variant",
            text="version",
            hover_data={"size": True, "size_mb": False, key: f":{hover}"},
            labels={"latency_ms": "latency at training time (ms, batch 1)", key: name},
            title=title or f"Size / latency / {name} (all versions, variants marked)",
        )
        .update_traces(textposition="top center")
        .update_layout(yaxis_tickformat=axis)
    )


def quantization(row) -> dict | None:
    """An INT8 variant's evidence (``metrics.quantization`` of its manifest), else None."""
    return ((row.manifest or {}).get("metrics") or {}).get("quantization")


def variant_kind(row) -> str:
    if quantization(row):
        return "INT8"
    return "pruned" if row.parent_version_id is not None else "trained"


def parent_of(variants: list[dict], version: int) -> int | None:
    return next((v["parent_version"] for v in variants if v["version"] == version), None)


def quantization_panel(version: int, ev: dict, parent: int | None) -> None:
    """An INT8 variant against its fp32 source, both run by ONNX Runtime with the same threads
    on the same hold-out: accuracy, agreement, size, batch-1 latency and batch-32 throughput,
    as cards and one small chart of INT8 relative to fp32."""
    source = fmt.version(parent) if parent is not None else "its fp32 source"
    st.markdown(
        f"**{fmt.version(version)} is the INT8 variant of {source}**: ONNX Runtime static "
        f"quantization ({ev.get('quant_format', 'QDQ')}, per-channel weights, calibrated on "
        f"{ev.get('calibration_images', '?')} training images); fp32 and INT8 measured side by "
        f"side on the same {ev['holdout_n']:,} hold-out images, {ev['threads']} threads each."
    )
    lat_change = ev["latency_ms_b1_int8"] / ev["latency_ms_b1_fp32"] - 1
    change = round(-ev["accuracy_loss_points"], 2) or 0.0  # no "-0.00"
    cols = st.columns(5)
    cols[0].metric(
        "INT8 accuracy",
        fmt.percent(ev["accuracy_int8"], 2),
        delta=f"{change:+.2f} pp vs fp32",
        delta_color="normal" if change else "off",
        help=f"fp32: {fmt.percent(ev['accuracy_fp32'], 2)}; an INT8 variant is refused when it "
        f"loses more than {ev.get('max_loss_points', 0.5):g} points",
    )
    cols[1].metric(
        "top-1 agreement",
        fmt.percent(ev["agreement"], 1),
        help=f"same top-1 class as fp32; max |Δ probability| {ev['max_abs_prob_diff']:.3f}",
    )
    cols[2].metric(
        "model file",
        fmt.size(ev["bytes_int8"]),
        delta=f"{ev['size_ratio'] - 1:+.0%} vs {fmt.size(ev['bytes_fp32'])}",
        delta_color="inverse",
    )
    cols[3].metric(
        "latency, batch 1",
        fmt.ms(ev["latency_ms_b1_int8"]),
        delta=f"{lat_change:+.0%} vs {fmt.ms(ev['latency_ms_b1_fp32'])}",
        delta_color="inverse",
        help="median of one image at a time",
    )
    cols[4].metric(
        "throughput, batch 32",
        f"{ev['images_per_s_b32_int8']:,.0f} img/s",
        delta=f"{ev['speedup_b32'] - 1:+.0%} vs {ev['images_per_s_b32_fp32']:,.0f}",
    )
    rel = pd.DataFrame(
        [
            {"figure": "accuracy", "INT8 / fp32": ev["accuracy_int8"] / ev["accuracy_fp32"]},
            {"figure": "model file size", "INT8 / fp32": ev["size_ratio"]},
            {"figure": "latency, batch 1", "INT8 / fp32": 1 + lat_change},
            {"figure": "time per image, batch 32", "INT8 / fp32": 1 / ev["speedup_b32"]},
        ]
    )
    st.plotly_chart(
        px.bar(
            rel,
            x="INT8 / fp32",
            y="figure",
            orientation="h",
            text_auto=".2f",
            title=f"{fmt.version(version)} (INT8) relative to fp32 (1.0 = same; below 1: "
            "smaller, faster)",
        )
        .add_vline(x=1.0, line_dash="dot")
        .update_layout(height=260, yaxis_title="", margin={"t": 40, "b": 10}),
        width="stretch",
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
        variants = [
            {**registry.summary(v, session=s), "variant": variant_kind(v)} for v in versions
        ]
        int8 = {
            n: (quantization(names[n]), parent_of(variants, n))
            for n in (a, b)
            if quantization(names[n])
        }
        if rep.get("task") == "detection":
            config = registry.PolicyConfig.for_project(session=s, project_id=pid)
            policy = registry.evaluate_policy(rep, config)
            keys = holdout_keys(s, rep, pid)
    if rep.get("task") == "detection":
        detection_report(rep, a, b, policy, config, variants, keys)
    else:
        classification_report(rep, a, b, variants, pid, int8)


def classification_report(
    rep: dict, a: int, b: int, variants: list[dict], pid: int, int8: dict | None = None
) -> None:
    verdict = rep["verdict"]
    st.subheader(
        f"v{b} vs v{a}: {verdict} (McNemar p = {rep['mcnemar']['p_value']:.3g}, "
        f"n = {rep['n']:,} hold-out images of snapshot #{rep['snapshot_id']})"
    )
    st.caption(f"What this hold-out can show: {power_statement(rep['power'])}.")
    metric_table(rep, a, b)
    for version, (evidence, parent) in (int8 or {}).items():
        quantization_panel(version, evidence, parent)
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
    right.plotly_chart(tradeoff(variants, "accuracy", "accuracy", ".2%", ".0%"), width="stretch")
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


# --------------------------------------------------------------------------- detectors


def holdout_keys(s, rep: dict, pid: int) -> dict[int, str]:
    """Storage keys of the comparison's hold-out images, by image id (its disagreements
    index into ``holdout_image_ids``)."""
    items = snapshot_items(
        session=s, snapshot_id=rep["snapshot_id"], split=Split.HOLDOUT, project_id=pid
    )
    return {i.image_id: i.storage_key for i in items}


def ci_text(lo: float | None, hi: float | None, level: float) -> str:
    if lo is None or hi is None:
        return "no CI: the hold-out has no boxes"
    return f"{level:.0%} CI [{lo:+.3f}, {hi:+.3f}]"


def ap_range(values: pd.Series) -> list[float]:
    """A y range for APs: from 0 to a bit over the largest (small APs stay readable), at most
    1."""
    top = values.dropna().max() if values.notna().any() else 0.0
    return [0.0, min(1.0, max(0.1, float(top) * 1.25))]


def map_number(x: float | None) -> str:
    return fmt.MISSING if x is None else f"{x:.3f}"


def detection_headline(rep: dict, a: int, b: int) -> None:
    """mAP of both, the difference with its bootstrap CI, and the numbers people scan next:
    mAP@0.5, precision and recall at each version's shipped threshold, latency, size."""
    level = rep.get("confidence", 0.95)
    diff = fmt.MISSING if rep["diff"] is None else f"{rep['diff']:+.3f}"
    st.subheader(
        f"v{b} vs v{a}: mAP {map_number(rep['map_a'])} → {map_number(rep['map_b'])} "
        f"({diff}, {ci_text(rep['ci_low'], rep['ci_high'], level)})"
    )
    st.caption(
        f"COCO mAP (IoU 0.50:0.95) of both on the same {rep['n_images']:,} hold-out images of "
        f"snapshot #{rep['snapshot_id']}; the CI is a paired bootstrap over images "
        f"({rep['n_boot']:,} resamples): both versions are scored on each resample."
    )
    at_a, at_b = rep["at_threshold_a"], rep["at_threshold_b"]
    meta_a, meta_b = rep["meta_a"], rep["meta_b"]

    def delta(x: float | None, y: float | None) -> float | None:
        return None if x is None or y is None else y - x

    cols = st.columns(6)
    cols[0].metric(
        "mAP",
        map_number(rep["map_b"]),
        delta=None if rep["diff"] is None else f"{rep['diff']:+.3f} vs v{a}",
        help=f"v{b}'s COCO mAP; v{a}: {map_number(rep['map_a'])}",
    )
    cols[1].metric(
        "mAP@0.5",
        map_number(rep["map_50_b"]),
        delta=None if rep["map_50_diff"] is None else f"{rep['map_50_diff']:+.3f} vs v{a}",
        help=f"v{a}: {map_number(rep['map_50_a'])}; "
        + ci_text(rep["map_50_ci_low"], rep["map_50_ci_high"], level),
    )
    for col, key, name in ((cols[2], "precision", "precision"), (cols[3], "recall", "recall")):
        d = delta(at_a[key], at_b[key])
        col.metric(
            name,
            fmt.percent(at_b[key]),
            delta=None if d is None else f"{fmt.points(d)} vs v{a}",
            help=f"Of v{b}'s shown boxes (score ≥ {at_b['threshold']:.2f}) at IoU "
            f"{at_b['iou']}; v{a} at its threshold {at_a['threshold']:.2f}: "
            f"{fmt.percent(at_a[key])}",
        )
    lat = delta(meta_a.get("latency_ms"), meta_b.get("latency_ms"))
    cols[4].metric(
        "latency",
        fmt.ms(meta_b.get("latency_ms")),
        delta=None if lat is None else f"{fmt.metric_delta('latency_ms', lat)} vs v{a}",
        delta_color="inverse",
        help="Median per image, batch 1, on this machine's CPU, measured for this comparison",
    )
    size = delta(meta_a.get("size_bytes"), meta_b.get("size_bytes"))
    cols[5].metric(
        "size",
        fmt.size(meta_b.get("size_bytes")),
        delta=None
        if size is None
        else f"same as v{a}"
        if size == 0
        else f"{fmt.metric_delta('size_bytes', size)} vs v{a}",
        delta_color="off" if size == 0 else "inverse",
        delta_arrow="off" if size == 0 else "auto",
    )
    thr = rep["thresholds"]
    tuned = [f"v{v}" for v, t in ((a, thr["a"]), (b, thr["b"])) if t["source"] != "given"]
    if tuned:
        st.caption(
            f"{' and '.join(tuned)} shipped no score threshold: the best-F1 one on this "
            "hold-out is used, which flatters it."
        )


def map_bars(rep: dict, a: int, b: int, config) -> None:
    """mAP, mAP@0.5/0.75 and mAP by object size, both versions side by side; beside them the
    difference B - A with its bootstrap CI (the policy's margin dashed)."""
    sizes = rep["sizes"]
    rows = []
    for key, name in MAP_BARS.items():
        bucket = key.removeprefix("map_")
        if bucket in sizes:
            name = f"{name}<br>({sizes[bucket]['boxes']:,} boxes)"
        for side, v in (("a", a), ("b", b)):
            rows.append({"metric": name, "version": f"v{v}", "value": rep["metrics"][key][side]})
    df = pd.DataFrame(rows)
    left, right = st.columns([2, 1])
    left.plotly_chart(
        px.bar(
            df,
            x="metric",
            y="value",
            color="version",
            barmode="group",
            text_auto=".3f",
            color_discrete_sequence=list(COLOURS.values()),
            title="mAP side by side (COCO; by object size: small < 32², large > 96² px)",
            labels={"value": "AP", "metric": "", "version": ""},
        )
        .update_traces(hovertemplate="%{x}: %{y:.3f}<extra></extra>", textposition="outside")
        .update_layout(yaxis_range=ap_range(df["value"]), legend_orientation="h", legend_y=1.12),
        width="stretch",
    )
    level = rep.get("confidence", 0.95)
    ci = pd.DataFrame(
        [
            {
                "what": name,
                "diff": rep[f"{prefix}diff"],
                "lo": rep[f"{prefix}ci_low"],
                "hi": rep[f"{prefix}ci_high"],
            }
            for prefix, name in (("", "mAP"), ("map_50_", "mAP@0.5"))
            if rep[f"{prefix}diff"] is not None
        ]
    )
    fig = go.Figure()
    if not ci.empty:
        fig.add_trace(
            go.Scatter(
                x=ci["diff"],
                y=ci["what"],
                mode="markers",
                marker={"size": 12, "color": COLOURS["B"]},
                error_x={
                    "type": "data",
                    "symmetric": False,
                    "array": ci["hi"] - ci["diff"],
                    "arrayminus": ci["diff"] - ci["lo"],
                    "thickness": 3,
                    "width": 8,
                },
                customdata=ci[["lo", "hi"]],
                hovertemplate="%{y}: %{x:+.3f}<br>"
                + f"{level:.0%} CI"
                + " [%{customdata[0]:+.3f}, %{customdata[1]:+.3f}]<extra></extra>",
                showlegend=False,
            )
        )
    fig.add_vline(x=0, line_color="gray")
    margin = getattr(config, "map_margin", None)
    if margin:
        fig.add_vline(
            x=-margin,
            line_dash="dash",
            line_color="#d62728",
            annotation_text=f"margin −{margin:g}",
            annotation_position="top left",
        )
    right.plotly_chart(
        fig.update_layout(
            title=f"mAP difference v{b} − v{a} ({level:.0%} CI)",
            xaxis_title="B − A (AP)",
            xaxis_zeroline=False,
            yaxis_type="category",
            height=320,
            margin={"t": 70},
        ),
        width="stretch",
    )


def class_ap(rep: dict, a: int, b: int) -> None:
    """AP per class, both versions side by side (AP@0.5 on a switch)."""
    iou = st.radio(
        "AP per class at",
        ["IoU 0.50:0.95", "IoU 0.5"],
        horizontal=True,
        key="compare-class-iou",
    )
    key = "ap" if iou == "IoU 0.50:0.95" else "ap_50"
    rows = []
    for c, m in rep["per_class"].items():
        for side, v in (("a", a), ("b", b)):
            rows.append(
                {
                    "class": f"{c} ({m['support']:,})",
                    "version": f"v{v}",
                    "AP": m[f"{key}_{side}"],
                }
            )
    df = pd.DataFrame(rows)
    st.plotly_chart(
        px.bar(
            df,
            x="class",
            y="AP",
            color="version",
            barmode="group",
            color_discrete_sequence=list(COLOURS.values()),
            title=f"AP per class at {iou} (hold-out boxes in brackets)",
            labels={"version": "", "class": ""},
        )
        .update_traces(hovertemplate="class %{x}: %{y:.3f}<extra></extra>")
        .update_layout(
            xaxis_type="category",
            yaxis_range=ap_range(df["AP"]),
            legend_orientation="h",
            legend_y=1.12,
        ),
        width="stretch",
    )


def pr_curves(rep: dict, a: int, b: int, which: str) -> None:
    """Both versions' precision-recall curves at IoU 0.5 (``which``: "every class" or one
    class), with the point each version's threshold puts it at."""
    fig = go.Figure()
    for side, v in (("a", a), ("b", b)):
        report = rep[f"report_{side}"]
        curve = report["pr_curve"] if which == "every class" else report["pr_curves"].get(which)
        if curve is None:
            continue
        colour = COLOURS[side.upper()]
        # only the recalls the version reaches (beyond them the curve's precision is 0 by
        # definition, not a measured point)
        reached = [i for i, score in enumerate(curve["score"]) if score is not None]
        fig.add_trace(
            go.Scatter(
                x=[curve["recall"][i] for i in reached],
                y=[curve["precision"][i] for i in reached],
                mode="lines",
                name=f"v{v}",
                line={"color": colour, "shape": "hv"},
                customdata=[[curve["score"][i]] for i in reached],
                hovertemplate="recall %{x:.0%}: precision %{y:.1%}"
                "<br>score ≥ %{customdata[0]:.2f}<extra>" + f"v{v}</extra>",
            )
        )
        at = rep[f"at_threshold_{side}"]
        if which == "every class" and at is not None:
            fig.add_trace(
                go.Scatter(
                    x=[at["recall"]],
                    y=[at["precision"]],
                    mode="markers",
                    marker={
                        "color": colour,
                        "size": 11,
                        "symbol": "diamond",
                        "line": {"color": "white", "width": 1},
                    },
                    name=f"v{v} at score ≥ {at['threshold']:.2f}",
                    hovertemplate="recall %{x:.1%}, precision %{y:.1%}<extra></extra>",
                )
            )
    if not fig.data:
        st.caption(f"No true box of class {which} on the hold-out: no curve.")
        return
    st.plotly_chart(
        fig.update_layout(
            title="Precision-recall at IoU 0.5 (every box, interpolated)",
            xaxis_title="recall",
            yaxis_title="precision",
            xaxis_tickformat=".0%",
            yaxis_tickformat=".0%",
            xaxis_range=[0, 1.02],
            yaxis_range=[0, 1.05],
            legend_orientation="h",
            legend_y=-0.2,
        ),
        width="stretch",
    )


def disagreements(rep: dict, a: int, b: int, keys: dict[int, str]) -> None:
    """The hold-out images where the two versions' shown boxes differ most: each image twice,
    A's boxes (blue) beside B's (orange), the true boxes dashed under both."""
    dis = rep["disagreement"]
    rows = dis["images"]
    st.subheader("Where they disagree")
    st.caption(
        f"{dis['n_disagreeing']:,} of {rep['n_images']:,} hold-out images where the two "
        f"versions' shown boxes differ (same label at IoU ≥ 0.5 counts as agreeing; mean "
        f"agreement {fmt.percent(dis['mean_agreement'])})"
        + (f"; the {len(rows)} that differ most below" if rows else "")
        + f". Blue: v{a}'s boxes at score ≥ {rep['thresholds']['a']['value']:.2f}; orange: "
        f"v{b}'s at ≥ {rep['thresholds']['b']['value']:.2f}; dashed white: the true boxes."
    )
    ids = rep["holdout_image_ids"]
    cols = st.columns(2)
    for k, row in enumerate(rows):
        image_id = ids[row["image"]] if row["image"] < len(ids) else None
        key = keys.get(image_id)
        col = cols[k % 2]
        if key is None:
            col.caption(f"hold-out image {row['image']} is no longer in storage")
            continue
        col.image(
            wb.compared(key, row["boxes_a"], row["boxes_b"], (f"v{a}", f"v{b}"), row["truth"]),
            width="stretch",
        )
        col.caption(
            f"image #{image_id}: {fmt.percent(row['disagreement'], 0)} of boxes differ · "
            f"AP on this image v{a} {map_number(row['ap_a'])} → v{b} {map_number(row['ap_b'])}"
            f" · {len(row['truth'])} true boxes"
        )


def detection_report(
    rep: dict, a: int, b: int, policy, config, variants: list[dict], keys: dict[int, str]
) -> None:
    detection_headline(rep, a, b)
    wb.policy_verdict(policy)
    map_bars(rep, a, b, config)
    class_ap(rep, a, b)
    which = st.columns(2)[0].selectbox(
        "Precision-recall of",
        ["every class", *rep["per_class"]],
        key="compare-pr-class",
        format_func=lambda c: c if c == "every class" else f"class {c}",
    )
    left, right = st.columns(2)
    with left:
        pr_curves(rep, a, b, which)
    with right:
        st.plotly_chart(
            tradeoff(variants, "map", "mAP", ".3f", ".2f", "Size / latency / mAP (all versions)"),
            width="stretch",
        )
    disagreements(rep, a, b, keys)


wb.guarded(body)

"""INT8 as a model variant, on a real trained model and the real demo digits: ONNX Runtime
static quantization (QDQ) makes the file < 0.5x, keeps hold-out accuracy within 0.5 points,
records its evidence, loads, verifies and runs; the loss gate refuses; registered, it is a
candidate whose comparison with its fp32 parent scores the INT8 graph itself (SQLite)."""

from __future__ import annotations

import json

import pytest
from helpers.data import SEED_SIZE
from sqlalchemy.orm import Session

from quarkflow_core import migrations, registry
from quarkflow_core.database import make_engine
from quarkflow_core.demo_data import seed_demo
from quarkflow_core.errors import InvalidInput
from quarkflow_core.ml.artifacts import load_artifact, manifest_sha256, verify_artifact
from quarkflow_core.ml.quantize import ort_logits, requires_onnxruntime, session
from quarkflow_core.pipeline import RetrainSpec, quantize_step
from quarkflow_core.storage import LocalStorage
from quarkflow_core.training_runs import default_snapshot_id, load_holdout

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """The demo seed (480 train + 120 hold-out digits) in a SQLite database."""
    root = tmp_path_factory.mktemp("quantize")
    url = f"sqlite:///{root / 'qf.db'}"
    migrations.upgrade(url)
    engine = make_engine(url)
    storage = LocalStorage(root / "store")
    with Session(engine, expire_on_commit=False) as s:
        seed_demo(session=s, storage=storage, limit=SEED_SIZE)
        s.commit()
        yield {"session": s, "storage": storage, "root": root}
    engine.dispose()


@pytest.fixture(scope="module")
def int8(env, trained_artifacts):
    """The strong model quantized through the pipeline step (the CLI's and the flow's)."""
    s = env["session"]
    out = env["root"] / "int8"
    result = quantize_step(
        session=s,
        storage=env["storage"],
        artifact_dir=str(trained_artifacts["strong"]),
        snapshot_id=default_snapshot_id(session=s),
        out_dir=out,
    )
    return result


def test_int8_is_smaller_and_as_accurate(int8):
    ev = int8["report"]
    assert ev["holdout_n"] == 120
    assert ev["size_ratio"] < 0.5 and ev["bytes_int8"] < 0.5 * ev["bytes_fp32"]
    assert ev["accuracy_loss_points"] <= 0.5
    assert ev["accuracy_fp32"] > 0.85  # a real model, not chance
    assert ev["agreement"] >= 0.97
    assert 0.0 <= ev["max_abs_prob_diff"] < 0.5
    assert ev["quant_format"] == "QDQ" and ev["per_channel"] and ev["calibration_images"] > 100
    assert ev["threads"] == 2
    for key in ("latency_ms_b1_fp32", "latency_ms_b1_int8"):
        assert ev[key] > 0
    assert ev["images_per_s_b32_fp32"] > 0 and ev["images_per_s_b32_int8"] > 0


def test_int8_artifact_loads_verifies_and_its_onnx_matches_the_manifest(
    int8, env, trained_artifacts
):
    out = env["root"] / "int8"
    manifest = verify_artifact(out)
    assert set(manifest["files"]) == {"weights.pt", "model.onnx"}
    assert requires_onnxruntime(manifest) and manifest["serving"]["requires"] == "onnxruntime"
    assert manifest["metrics"]["quantization"] == json.loads(json.dumps(int8["report"]))
    parent = load_artifact(trained_artifacts["strong"])
    assert manifest["parent"]["manifest_sha256"] == manifest_sha256(parent.path)
    assert manifest["classes"] == parent.classes
    assert manifest["preprocess"] == parent.manifest["preprocess"]
    assert manifest["exports"]["onnx"]["precision"] == "int8"
    assert 0 < manifest["metrics"]["review_threshold"]["threshold"] <= 1
    loaded = load_artifact(out, expected_sha256=int8["sha256"])
    assert loaded.temperature == manifest["metrics"]["temperature"] > 0
    hold = manifest["metrics"]["holdout"]
    assert hold["latency"]["backend"] == "onnxruntime"
    # ONNX Runtime runs the INT8 graph; its hold-out accuracy is the manifest's
    _, holdout = load_holdout(
        session=env["session"], storage=env["storage"], snapshot_id=None, preset=loaded.preset
    )
    logits = ort_logits(session(out / "model.onnx"), holdout.images, loaded.preset)
    accuracy = float((logits.argmax(1) == holdout.labels).float().mean())
    assert (
        accuracy
        == pytest.approx(hold["accuracy"])
        == pytest.approx(int8["report"]["accuracy_int8"])
    )
    # the graph really is quantized: QDQ pairs around int8 weights
    import onnx

    graph = onnx.load(str(out / "model.onnx")).graph
    ops = {n.op_type for n in graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert any(t.data_type == onnx.TensorProto.INT8 for t in graph.initializer)


def test_the_loss_gate_refuses_with_the_figures(int8, env, trained_artifacts):
    """The same real quantization, with a limit just below the loss it really has."""
    s = env["session"]
    observed = int8["report"]["accuracy_loss_points"]
    out = env["root"] / "refused"
    with pytest.raises(InvalidInput, match=r"INT8 variant refused: it loses .* points.*agreement"):
        quantize_step(
            session=s,
            storage=env["storage"],
            artifact_dir=str(trained_artifacts["strong"]),
            snapshot_id=default_snapshot_id(session=s),
            out_dir=out,
            max_loss_points=observed - 0.01,
        )
    assert not out.exists() or not any(out.iterdir())  # nothing saved


def test_registered_int8_is_a_candidate_compared_with_its_parent(int8, env, trained_artifacts):
    s, storage = env["session"], env["storage"]
    parent = registry.register_version(
        session=s, storage=storage, artifact_dir=trained_artifacts["strong"], created_by="t"
    )
    child = registry.register_version(
        session=s,
        storage=storage,
        artifact_dir=env["root"] / "int8",
        created_by="t",
        as_challenger=True,
    )
    assert child.parent_version_id == parent.id
    assert registry.get_version(session=s, ref="challenger").id == child.id
    ev = int8["report"]
    assert child.metrics["accuracy"] == pytest.approx(ev["accuracy_int8"])
    assert child.metrics["latency_ms_batch1"] > 0
    cache = env["root"] / "cache"
    rep = registry.compare_versions(session=s, storage=storage, a=parent, b=child, cache_root=cache)
    # scored on the same hold-out; the candidate through its INT8 graph, not its fp32 weights
    assert rep["n"] == ev["holdout_n"]
    assert rep["accuracy_b"] == pytest.approx(ev["accuracy_int8"])
    assert rep["accuracy_a"] == pytest.approx(ev["accuracy_fp32"])
    assert rep["meta_b"]["latency_ms"] > 0 and rep["verdict"]
    evidence = registry.propose(session=s, storage=storage, ref=child, cache_root=cache).evidence
    assert evidence["pruning"]["candidate_is_int8"]
    assert evidence["pruning"]["candidate_quantization"]["size_ratio"] == ev["size_ratio"]
    assert evidence["lineage"]["parents"][0]["version"] == parent.version
    variants = registry.propose(session=s, storage=storage, ref=parent, cache_root=cache).evidence[
        "pruning"
    ]["variants"]
    assert variants[0]["quantization"]["accuracy_int8"] == pytest.approx(ev["accuracy_int8"])


@pytest.mark.unit
def test_retrain_spec_key_is_unchanged_without_quantize():
    assert RetrainSpec().key("h") == RetrainSpec(quantize=False).key("h")
    assert RetrainSpec(quantize=True).key("h") != RetrainSpec().key("h")


def test_an_int8_variant_is_not_quantized_again(int8, env):
    with pytest.raises(InvalidInput, match="INT8 variant already"):
        quantize_step(
            session=env["session"],
            storage=env["storage"],
            artifact_dir=str(env["root"] / "int8"),
            snapshot_id=default_snapshot_id(session=env["session"]),
            out_dir=env["root"] / "twice",
        )


def test_workbench_compares_int8_with_its_parent(int8, env, trained_artifacts, monkeypatch):
    """Model comparison shows the INT8 evidence as cards and a chart (Streamlit AppTest)."""
    from streamlit.testing.v1 import AppTest

    from quarkflow_core.config import get_settings

    s, storage = env["session"], env["storage"]
    registry.register_version(
        session=s, storage=storage, artifact_dir=trained_artifacts["strong"], created_by="t"
    )
    child = registry.register_version(
        session=s,
        storage=storage,
        artifact_dir=env["root"] / "int8",
        created_by="t",
        as_challenger=True,
    )
    for key, value in {
        "QF_DATABASE_URL": f"sqlite:///{env['root'] / 'qf.db'}",
        "QF_STORAGE_URL": f"file://{env['root'] / 'store'}",
        "QF_DATA_DIR": str(env["root"] / "data"),
    }.items():
        monkeypatch.setenv(key, value)
    get_settings.cache_clear()
    at = AppTest.from_file("../app/workbench.py", default_timeout=120)
    at.session_state["user"] = {"username": "lead", "role": "ml_lead"}
    at.run()
    at.switch_page("../pages/compare.py").run()
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    assert any(f"v{child.version} is the INT8 variant of v" in m.value for m in at.markdown)
    shown = {m.label: m.value for m in at.metric}
    ev = int8["report"]
    assert shown["INT8 accuracy"] == f"{ev['accuracy_int8']:.2%}"
    assert shown["model file"].endswith("KB") and shown["throughput, batch 32"].endswith("img/s")


def test_retrain_registers_int8_as_the_candidate_linked_to_its_parent(
    int8, env, trained_artifacts, tmp_path
):
    """The flow's register step: the fp32 parent first (its manifest gains the retrain key, so
    its sha256 changes), then the INT8 candidate, its parent link pointed at that version."""
    import shutil

    from quarkflow_core.pipeline import register_step

    parent_dir, child_dir = tmp_path / "fp32", tmp_path / "int8"
    shutil.copytree(trained_artifacts["strong"], parent_dir)
    shutil.copytree(env["root"] / "int8", child_dir)
    s, storage = env["session"], env["storage"]
    out = register_step(
        session=s,
        storage=storage,
        key="k-int8",
        artifact_dir=str(child_dir),
        parent_dir=str(parent_dir),
        actor="flow:retrain",
        cache_root=env["root"] / "cache",
    )
    child = registry.get_version(session=s, ref=out["version"])
    parent = registry.get_version(session=s, ref="v" + str(out["version"] - 1))
    assert child.parent_version_id == parent.id
    assert child.manifest["retrain"] == {"key": "k-int8", "candidate": True}
    assert parent.manifest["retrain"] == {"key": "k-int8", "candidate": False}
    assert registry.get_version(session=s, ref="challenger").id == child.id
    assert out["metrics"]["accuracy"] == pytest.approx(int8["report"]["accuracy_int8"])
    verify_artifact(child_dir)  # the updated manifest still covers every file


@pytest.mark.unit
def test_retrain_report_gives_the_int8_evidence_or_its_refusal(int8):
    from quarkflow_core.pipeline import report_markdown

    base = {"snapshot": {}, "candidate": {"policy": {"checks": []}}}
    text = report_markdown({**base, "quantize": int8["report"]})
    assert "| INT8 (ONNX Runtime, QDQ) | hold-out accuracy" in text and "agreement" in text
    refused = report_markdown({**base, "quantize": {"refused": "INT8 variant refused: ..."}})
    assert "| INT8 (ONNX Runtime, QDQ) | refused: INT8 variant refused" in refused


def test_cli_quantize_evaluate_and_compare_use_the_int8_graph(
    int8, env, trained_artifacts, monkeypatch
):
    """`quarkflow quantize`, then `evaluate` and `compare` score the INT8 graph (ONNX Runtime),
    not the fp32 weights kept in its folder."""
    from typer.testing import CliRunner

    from app.cli import app
    from quarkflow_core.config import get_settings

    monkeypatch.setenv("QF_DATABASE_URL", f"sqlite:///{env['root'] / 'qf.db'}")
    monkeypatch.setenv("QF_STORAGE_URL", f"file://{env['root'] / 'store'}")
    monkeypatch.setenv("COLUMNS", "200")
    get_settings.cache_clear()
    out_dir = env["root"] / "cli-int8"
    run = CliRunner().invoke(
        app, ["quantize", str(trained_artifacts["strong"]), "--out", str(out_dir)]
    )
    assert run.exit_code == 0, run.output + repr(run.exception)
    assert "INT8 artifact:" in run.output and "top-1 agreement" in run.output
    assert verify_artifact(out_dir)["metrics"]["quantization"]["accuracy_int8"] == pytest.approx(
        int8["report"]["accuracy_int8"]
    )
    ev = CliRunner().invoke(
        app, ["evaluate", str(out_dir), "--json", str(out_dir.parent / "e.json")]
    )
    assert ev.exit_code == 0, ev.output + repr(ev.exception)
    report = json.loads((out_dir.parent / "e.json").read_text())
    assert report["latency"]["backend"] == "onnxruntime"
    assert report["accuracy"] == pytest.approx(int8["report"]["accuracy_int8"])
    cmp_json = out_dir.parent / "c.json"
    cmp = CliRunner().invoke(
        app, ["compare", str(trained_artifacts["strong"]), str(out_dir), "--json", str(cmp_json)]
    )
    assert cmp.exit_code == 0, cmp.output + repr(cmp.exception)
    rep = json.loads(cmp_json.read_text())
    assert rep["accuracy_b"] == pytest.approx(int8["report"]["accuracy_int8"])

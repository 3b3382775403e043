"""`quarkflow simulate-loop` (issue 15): the loop replayed on labelled data through the real
queue, retrain and approval code, in a temporary workspace."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from app import cli
from quarkflow_core.demo_data import demo_pngs
from quarkflow_core.errors import InvalidInput
from quarkflow_core.simulate import LabelledData, SimulationSpec, curve_bands, load_results


@pytest.fixture(scope="module")
def labelled_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("labelled")
    pngs, labels = demo_pngs(900)
    for i, (png, label) in enumerate(zip(pngs, labels, strict=True)):
        (root / label).mkdir(exist_ok=True)
        (root / label / f"{i:04d}.png").write_bytes(png)
    return root


def test_simulate_loop_on_a_labelled_folder(labelled_folder, tmp_path):
    out = CliRunner().invoke(
        cli.app,
        [
            "simulate-loop",
            "--folder", str(labelled_folder),
            "--seed-size", "150",
            "--pool-size", "400",
            "--test-size", "300",
            "--rounds", "2",
            "--per-round", "40",
            "--strategy", "random",
            "--strategy", "diverse",
            "--seeds", "0",
            "--epochs", "15",
            "--out", str(tmp_path / "sims"),
            "--json",
        ],
    )  # fmt: skip
    assert out.exit_code == 0, out.output
    result = json.loads(out.stdout)
    assert result["data"]["images"] == 900 and len(result["data"]["classes"]) == 10
    runs = {r["strategy"]: r["rounds"] for r in result["runs"]}
    assert set(runs) == {"random", "diverse"}
    for rounds in runs.values():
        assert [r["answered"] for r in rounds] == [0, 40, 80]
        assert all(0.3 < r["accuracy"] <= 1 for r in rounds), rounds
        # the hold-out grows with the answers (a share of the settled labels), never shrinks
        sizes = [r["holdout"] for r in rounds]
        assert sizes == sorted(sizes) and sizes[-1] > sizes[0]
        assert rounds[0]["policy"] == "no_champion" and rounds[0]["approved"]
    # the queue asks about the model's mistakes far more often than a random pick does
    asked_wrong = {s: sum(r["errors_in_answers"] for r in rounds) for s, rounds in runs.items()}
    assert asked_wrong["diverse"] > asked_wrong["random"], asked_wrong
    # the same seed gives both strategies the same seed model (a fair start)
    assert runs["random"][0]["accuracy"] == runs["diverse"][0]["accuracy"]
    summary = result["summary"]
    assert summary["target_from"] == "random"
    assert summary["target_accuracy"] == pytest.approx(runs["random"][-1]["accuracy"])
    # saved where the workbench page reads it, and the bands it plots
    [(path, saved)] = load_results([tmp_path / "sims"])
    assert saved["runs"] == result["runs"] and str(path) == result["path"]
    bands = curve_bands(saved)
    assert {(b["strategy"], b["answered"]) for b in bands} == {
        (s, n) for s in ("random", "diverse") for n in (0, 40, 80)
    }


def test_simulation_spec_errors_name_the_problem(labelled_folder, tmp_path):
    data = LabelledData.from_folder(labelled_folder)
    with pytest.raises(InvalidInput, match="has 900"):
        SimulationSpec(seed_size=500, pool_size=500, test_size=100).validate(data)
    with pytest.raises(InvalidInput, match="unknown strategy"):
        SimulationSpec(strategies=("loudest",), pool_size=100, test_size=100).validate(data)
    with pytest.raises(InvalidInput, match="exceed the pool"):
        SimulationSpec(pool_size=100, test_size=100, rounds=3, per_round=50).validate(data)
    (tmp_path / "only").mkdir()
    with pytest.raises(InvalidInput, match="one sub-folder per class"):
        LabelledData.from_folder(tmp_path)
    bad = CliRunner().invoke(cli.app, ["simulate-loop", "--seeds", "a,b"])
    assert bad.exit_code != 0


def test_a_dataset_snapshot_is_labelled_data_for_the_simulator(db_session, tmp_path):
    """`simulate-loop --snapshot N` reads a snapshot's images and labels (all splits)."""
    from quarkflow_core.demo_data import seed_demo
    from quarkflow_core.storage import storage_from_url

    storage = storage_from_url(f"file://{tmp_path}/store")
    seed_demo(session=db_session, storage=storage, limit=40)
    db_session.commit()
    from quarkflow_core.labels import seed_snapshot

    snap = seed_snapshot(session=db_session)
    data = LabelledData.from_snapshot(session=db_session, storage=storage, snapshot_id=snap.id)
    pngs, labels = demo_pngs(40)
    assert sorted(data.labels) == sorted(labels)
    assert sorted(data.images) == sorted(pngs)

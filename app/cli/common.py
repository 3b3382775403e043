"""What every command shares: the consoles, settings, a database session, progress bars,
tables of values, and who is acting."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from sqlalchemy.orm import Session

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


USER_OPT = typer.Option(None, "--user", help="Who acts (default: QF_USER). Must be an ml_lead.")
REASON_OPT = typer.Option(..., "--reason", help="Why; kept for ever in the promotion history.")


# ----------------------------------------------------------------------------- the project

PROJECT_META_KEY = "quarkflow.project"
DEFAULT_PROJECT_NAME = "default"
# typer keeps its own (vendored) click, whose current context plain ``click`` cannot see: the
# root callback (``use_project``) sets this for the command it runs, and resets it after.
_PROJECT: ContextVar[str] = ContextVar("quarkflow_project", default=DEFAULT_PROJECT_NAME)


def use_project(ctx: typer.Context, name: str) -> None:
    """``quarkflow --project NAME``: the project of the command ``ctx`` runs (and ``ctx.meta``),
    until it ends."""
    token = _PROJECT.set(name or DEFAULT_PROJECT_NAME)
    ctx.meta[PROJECT_META_KEY] = name or DEFAULT_PROJECT_NAME
    ctx.call_on_close(lambda: _PROJECT.reset(token))


def project_name() -> str:
    """The project this command works in: ``quarkflow --project NAME`` (default: ``default``).
    Outside a command (a test calling a function directly) it is the default project."""
    return _PROJECT.get()


def current_project(session: Session):
    """The ``--project`` row; an unknown name raises NotFound naming the projects."""
    from quarkflow_core.projects import get_project

    return get_project(session=session, ref=project_name())


def project_id(session: Session) -> int:
    """The id of the ``--project`` project: pass it as ``project_id=`` to every core call."""
    return current_project(session).id


def _acting_user(session: Session, username: str | None):
    from quarkflow_core.errors import InvalidInput
    from quarkflow_core.users import get_user

    username = username or _settings().user
    if not username:
        raise InvalidInput("say who is acting: --user NAME (or set QF_USER)")
    return get_user(session=session, username=username)

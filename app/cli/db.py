"""`quarkflow db ...` (Alembic migrations, the app role's grants), `init` and `doctor`.

Top-level commands are registered (in `quarkflow --help` order) by app/cli/__init__.py."""

from __future__ import annotations

import typer

from app.cli.common import _settings, console

db_app = typer.Typer(help="Database schema (Alembic migrations).", no_args_is_help=True)


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


def doctor() -> None:
    """Check settings, database and storage; print what is in use (the projects, the torch
    build and whether a CUDA device can be used)."""
    import torch

    from quarkflow_core.database import check_database, get_engine
    from quarkflow_core.migrations import head_revision
    from quarkflow_core.ml.backends import cuda_status
    from quarkflow_core.storage import get_storage

    usable, what = cuda_status()  # first: it needs no setting (a GPU node checked by hand)
    console.print(f"torch {torch.__version__}: " + (f"CUDA device {what}" if usable else what))
    s = _settings()
    console.print(f"settings ok: database={s.database_backend} storage={s.storage_url}")
    engine = get_engine(s.database_url)
    rev = check_database(engine, require_migrated=False)
    console.print(f"database reachable, revision {rev or '(empty)'} (code head {head_revision()})")
    if rev == head_revision():
        from quarkflow_core.database import session_scope
        from quarkflow_core.projects import list_projects

        with session_scope(engine) as session:
            names = [p.name for p in list_projects(session=session)]
        console.print(f"projects: {', '.join(names) or '(none)'}")
    get_storage().check()
    console.print("storage reachable")

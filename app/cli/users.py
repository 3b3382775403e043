"""`quarkflow users ...` and `quarkflow tokens ...`. Whoever runs them holds the database's
credentials: they act as the ``Operator`` (admin), audited as ``cli:<login>``."""

from __future__ import annotations

import getpass
import sys
from datetime import timedelta

import typer
from rich.table import Table

from app.cli.common import _session, _settings, console, err_console

users_app = typer.Typer(help="Users and roles.", no_args_is_help=True)
tokens_app = typer.Typer(help="API tokens (shown once, stored hashed).", no_args_is_help=True)


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
    from quarkflow_core.users import Operator, admin_create_user

    if password is None and not no_password:
        if not sys.stdin.isatty():
            raise typer.BadParameter("give --password or --no-password when not on a terminal")
        password = getpass.getpass(f"password for {username}: ")
    with _session() as session:
        user = admin_create_user(
            session=session,
            actor=Operator.current(),
            username=username,
            role=role,
            password=password,
        )
        console.print(f"created user [bold]{user.username}[/bold] with role {user.role.value}")


@users_app.command("list")
def users_list() -> None:
    """List users, their roles, and their per-project grants (`quarkflow projects grant`)."""
    from sqlalchemy import select

    from quarkflow_core.schema import Project, ProjectGrant, User

    with _session() as session:
        grants: dict[int, list[str]] = {}
        for user_id, project, role in session.execute(
            select(ProjectGrant.user_id, Project.name, ProjectGrant.role)
            .join(Project, Project.id == ProjectGrant.project_id)
            .order_by(Project.name)
        ):
            grants.setdefault(user_id, []).append(f"{project}: {role.value}")
        table = Table("id", "username", "role", "project grants", "active", "created")
        for u in session.scalars(select(User).order_by(User.id)):
            table.add_row(
                str(u.id),
                u.username,
                u.role.value,
                ", ".join(grants.get(u.id, [])) or "-",
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
    from quarkflow_core.users import Operator, admin_create_token

    with _session() as session:
        row, plaintext = admin_create_token(
            session=session,
            actor=Operator.current(),
            username=user,
            secret=_settings().secret_key.get_secret_value(),
            name=name,
            expires_in=timedelta(days=expires_days) if expires_days else None,
        )
        err_console.print(f"token #{row.id} for {user} (shown once; store it now):")
        print(plaintext)


@tokens_app.command("revoke")
def tokens_revoke(token_id: int) -> None:
    """Revoke a token by id."""
    from quarkflow_core.users import Operator, admin_revoke_token

    with _session() as session:
        admin_revoke_token(session=session, actor=Operator.current(), token_id=token_id)
    console.print(f"token #{token_id} revoked")

"""`quarkflow projects ...`: the installation's projects and per-project role grants. Like
`users`, whoever runs them holds the database's credentials: they act as the ``Operator``
(admin), audited as ``cli:<login>``. The global ``quarkflow --project NAME`` picks the project
every other command works in (``common.project_id``)."""

from __future__ import annotations

import json

import typer
from rich.table import Table

from app.cli.common import _print_kv, _session, console, project_name

projects_app = typer.Typer(
    help="Projects (model lines) and per-project roles.", no_args_is_help=True
)

PROJECT_ARG = typer.Argument(None, help="Project name or id (default: --project's).")


@projects_app.command("list")
def projects_list(
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """List the projects: name, title, task type, classes."""
    from quarkflow_core.projects import list_projects, project_dict

    with _session() as session:
        rows = [project_dict(p) for p in list_projects(session=session)]
    if as_json:
        print(json.dumps({"projects": rows}))
        return
    table = Table("id", "name", "title", "task type", "classes", "created")
    for p in rows:
        classes = ", ".join(p["classes"])
        table.add_row(
            str(p["id"]),
            p["name"],
            p["title"] or "-",
            p["task_type"],
            classes if len(classes) <= 60 else f"{classes[:57]}...",
            (p["created_at"] or "-")[:16].replace("T", " "),
        )
    console.print(table)


@projects_app.command("show")
def projects_show(
    project: str | None = PROJECT_ARG,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """One project, with its per-project role grants."""
    from quarkflow_core.projects import get_project, grants, project_dict

    with _session() as session:
        row = get_project(session=session, ref=project or project_name())
        info = {**project_dict(row), "grants": grants(session=session, project_id=row.id)}
    if as_json:
        print(json.dumps(info))
        return
    _print_kv(
        f"project {info['name']}",
        {
            "id": info["id"],
            "title": info["title"],
            "task type": info["task_type"],
            "classes": ", ".join(info["classes"]) or None,
            "Label Studio project": info["labelstudio_project_id"],
            "created by": info["created_by"],
            "created at": info["created_at"],
        },
    )
    for g in info["grants"]:
        console.print(f"grant: {g['username']} is {g['role']} here (by {g['granted_by']})")


@projects_app.command("create")
def projects_create(
    name: str = typer.Argument(..., help="1 to 30 of a-z, 0-9 and '-', not digits alone."),
    classes: str = typer.Option(..., help="Comma-separated class labels (at least two)."),
    task_type: str = typer.Option("classification", help="classification | detection"),
    title: str | None = typer.Option(None, help="A readable title."),
) -> None:
    """Create an empty project (no images, versions or champion yet); audited."""
    from quarkflow_core.projects import admin_create
    from quarkflow_core.users import Operator

    labels = [c.strip() for c in classes.split(",") if c.strip()]
    with _session() as session:
        row = admin_create(
            session=session,
            actor=Operator.current(),
            name=name,
            classes=labels,
            task_type=task_type,
            title=title,
        )
        console.print(
            f"created project [bold]{row.name}[/bold] (id {row.id}, {len(row.classes)} classes)"
        )


def _grant_or_revoke(project: str, username: str, role: str | None) -> None:
    from quarkflow_core.projects import admin_grant
    from quarkflow_core.users import Operator

    with _session() as session:
        out = admin_grant(
            session=session,
            actor=Operator.current(),
            project=project,
            username=username,
            role=role,
        )
    if role:
        console.print(f"{out['username']} is {out['role']} in project {out['project']}")
    else:
        console.print(
            f"{out['username']} has their own role ({out['own_role']}) in project "
            f"{out['project']}" + ("" if out["revoked"] else " (there was no grant)")
        )


@projects_app.command("grant")
def projects_grant(
    project: str = typer.Argument(..., help="Project name or id."),
    username: str = typer.Argument(..., help="The user."),
    role: str = typer.Option(..., help="domain_expert | analyst | ml_lead | admin"),
) -> None:
    """Give a user a role in one project, in place of their own there; audited."""
    _grant_or_revoke(project, username, role)


@projects_app.command("revoke")
def projects_revoke(
    project: str = typer.Argument(..., help="Project name or id."),
    username: str = typer.Argument(..., help="The user."),
) -> None:
    """Take a user's grant in one project away (their own role applies there again); audited."""
    _grant_or_revoke(project, username, None)

"""The ``quarkflow`` command. Thin: parse, call one core function, print the result.

One module per command group; this one builds the root app from them. The tables below are
the order `quarkflow --help` lists the commands in."""

from __future__ import annotations

import sys

import typer

from app.cli import data, db, ml, models, outbox, projects, review, serve, users
from app.cli.common import DEFAULT_PROJECT_NAME, err_console, use_project
from quarkflow_core.errors import QuarkflowError

app = typer.Typer(
    help="Quarkflow: human-in-the-loop MLOps for image classification.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def _root(
    ctx: typer.Context,
    project: str = typer.Option(
        DEFAULT_PROJECT_NAME,
        "--project",
        metavar="NAME",
        help="The project the command works in (see `quarkflow projects list`).",
    ),
) -> None:
    """Quarkflow: human-in-the-loop MLOps for image classification."""
    use_project(ctx, project)


COMMANDS = (
    ("init", db.init),
    ("seed-demo", data.seed_demo),
    ("train", ml.train),
    ("train-detector", ml.train_detector),
    ("models-zoo", ml.models_zoo),
    ("evaluate", ml.evaluate),
    ("compare", ml.compare_cmd),
    ("prune", ml.prune_cmd),
    ("quantize", ml.quantize_cmd),
    ("export", ml.export_cmd),
    ("demo-bootstrap", models.demo_bootstrap),
    ("serve", serve.serve),
    ("workbench", serve.workbench),
    ("demo", serve.demo),
    ("worker", serve.worker),
    ("retrain", ml.retrain_cmd),
    ("batch-predict", data.batch_predict_cmd),
    ("simulate-loop", review.simulate_loop_cmd),
    ("labelstudio-sync", data.labelstudio_sync_cmd),
    ("doctor", db.doctor),
)
GROUPS = (
    ("db", db.db_app),
    ("projects", projects.projects_app),
    ("users", users.users_app),
    ("tokens", users.tokens_app),
    ("models", models.models_app),
    ("review", review.review_app),
    ("outbox", outbox.outbox_app),
)
for _name, _command in COMMANDS:
    app.command(_name)(_command)
for _name, _group in GROUPS:
    app.add_typer(_group, name=_name)


def main() -> None:
    """Entry point: core errors become one red line and exit code 2."""
    try:
        app()
    except QuarkflowError as exc:
        err_console.print(f"[red]error:[/red] {exc.detail}", highlight=False, soft_wrap=True)
        sys.exit(2)

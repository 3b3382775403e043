"""`quarkflow outbox ...`: the API's outbox backlog and its dead letters."""

from __future__ import annotations

from datetime import UTC, datetime

import typer
from rich.table import Table

from app.cli.common import USER_OPT, _acting_user, _session, _settings, console

outbox_app = typer.Typer(
    help="The API's outbox: what was acknowledged but not yet written; its dead letters.",
    no_args_is_help=True,
)


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
    """The backlog, and the dead letters: records the database kept refusing (of every
    project: the outbox belongs to the installation; each record carries its project id)."""
    import json

    from quarkflow_core.schema import DEFAULT_PROJECT_ID

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
    for col in ("id", "kind", "key", "project", "tries", "failed at", "error"):
        table.add_column(col, overflow="fold")
    for d in letters:
        table.add_row(
            str(d.id),
            d.kind,
            d.key,
            str((d.payload or {}).get("project_id", DEFAULT_PROJECT_ID)),
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

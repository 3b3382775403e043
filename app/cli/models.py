"""`quarkflow models ...` (the registry: versions, approval, rollback, history) and
`demo-bootstrap`.

Top-level commands are registered (in `quarkflow --help` order) by app/cli/__init__.py. The
`models` commands work in the `quarkflow --project NAME` project (default: `default`): its
versions, champion, challenger and history."""

from __future__ import annotations

import getpass
from datetime import UTC, datetime
from pathlib import Path

import typer
from rich.table import Table
from sqlalchemy.orm import Session

from app.cli.common import (
    REASON_OPT,
    USER_OPT,
    _acting_user,
    _fmt,
    _print_kv,
    _session,
    _settings,
    console,
    project_id,
)

models_app = typer.Typer(
    help="Model registry: versions, champion/challenger, approval, rollback, history.",
    no_args_is_help=True,
)


def _cache_root() -> Path:
    from quarkflow_core.registry import model_cache_dir

    return model_cache_dir(_settings())


def _policy(session: Session, pid: int):
    """The QF_POLICY_* thresholds with the project's overrides."""
    from quarkflow_core.registry import PolicyConfig

    return PolicyConfig.for_project(session=session, project_id=pid, settings=_settings())


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
            project_id=project_id(session),
        )
        console.print(
            f"registered v{row.version} (sha256 {row.sha256[:12]}…) at {row.artifact_key}/"
        )


@models_app.command("list")
def models_list() -> None:
    """Every version with its aliases and headline metrics."""
    from quarkflow_core.registry import aliases, list_versions

    with _session() as session:
        pid = project_id(session)
        tags: dict[int, list[str]] = {}
        for alias, row in aliases(session=session, project_id=pid).items():
            tags.setdefault(row.id, []).append(alias)
        table = Table(
            "version", "aliases", "architecture", "accuracy", "ece", "size", "snapshot", "created"
        )
        for row in list_versions(session=session, project_id=pid):
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
        row = get_version(session=session, ref=version, project_id=project_id(session))
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
        pid = project_id(session)
        va = get_version(session=session, ref=a, project_id=pid)
        vb = get_version(session=session, ref=b, project_id=pid)
        policy_config = _policy(session, pid)
        with console.status("scoring both versions on the hold-out…"):
            report = compare_versions(
                session=session,
                storage=get_storage(),
                a=va,
                b=vb,
                cache_root=_cache_root(),
                snapshot_id=snapshot,
                project_id=pid,
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
    policy = evaluate_policy(report, policy_config)
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
        pid = project_id(session)
        with console.status("checking integrity and comparing with the champion…"):
            event = approve(
                session=session,
                storage=get_storage(),
                version=version,
                user=actor,
                reason=reason,
                cache_root=_cache_root(),
                override=override,
                config=_policy(session, pid),
                project_id=pid,
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
            session=session,
            version=version,
            user=_acting_user(session, user),
            reason=reason,
            project_id=project_id(session),
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
            project_id=project_id(session),
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
        pid = project_id(session)
        events = history(session=session, project_id=pid)
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
            row = champion_at(session=session, when=when, project_id=pid)
            who = f"v{row.version}" if row else "no version"
            console.print(f"champion at {when.isoformat()}: {who}")


def demo_bootstrap(
    artifact: Path = typer.Argument(..., help="The trained demo artifact folder."),
) -> None:
    """Register the demo model and, on a fresh install, approve it as the demo ml_lead."""
    from quarkflow_core.demo_data import DEMO_LEAD, DEMO_LEAD_PASSWORD, bootstrap_champion
    from quarkflow_core.storage import get_storage

    with _session() as session:
        version, promoted = bootstrap_champion(
            session=session,
            storage=get_storage(),
            artifact_dir=artifact,
            cache_root=_cache_root(),
            project_id=project_id(session),
        )
    if promoted:
        console.print(
            f"v{version} approved as champion by {DEMO_LEAD} (password {DEMO_LEAD_PASSWORD}); "
            "see `quarkflow models history`"
        )
    else:
        console.print(f"demo model is v{version}; a champion already exists, left as it is")

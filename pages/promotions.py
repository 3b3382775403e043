"""Promotions: the challenger's evidence and policy verdict; Approve / Reject / Roll back for
an ML lead (reason required); the full history. Others see it read-only."""

import pandas as pd
import streamlit as st

from app import wb
from quarkflow_core import formatting as fmt
from quarkflow_core import registry
from quarkflow_core.errors import QuarkflowError
from quarkflow_core.schema import Role


def next_version() -> str:
    """How to register a version, with the CLI commands for the current project."""
    return (
        f"an ML lead starts a retrain on Training runs, or run `{wb.command('train --out DIR')}`"
        f" then `{wb.command('models register DIR --challenger')}`"
    )


def evidence_line(comp: dict) -> str:
    """The comparison's headline: hold-out accuracy, or a detector's mAP with its CI."""
    a, b = f"v{comp['a']['version']}", f"v{comp['b']['version']}"
    if comp.get("task") == "detection":
        ci = (
            f", {comp.get('confidence', 0.95):.0%} CI [{comp['ci_low']:+.3f}, "
            f"{comp['ci_high']:+.3f}]"
            if comp.get("ci_low") is not None
            else ""
        )
        diff = "n/a" if comp.get("diff") is None else f"{comp['diff']:+.3f}"
        return (
            f"hold-out mAP {a} {fmt.number(comp['map_a'], 3)} → {b} "
            f"{fmt.number(comp['map_b'], 3)} ({diff}{ci} on {fmt.number(comp['n_images'])} images)"
        )
    return (
        f"hold-out accuracy {a} {fmt.percent(comp['accuracy_a'], 2)} → {b} "
        f"{fmt.percent(comp['accuracy_b'], 2)} ({fmt.points(comp['accuracy_delta'], 2)} on "
        f"{fmt.number(comp['n'])} images)"
    )


def history_table(events: list[dict]) -> None:
    df = pd.DataFrame(
        [
            {
                **e,
                "at": fmt.as_utc(e["at"]),
                "change": fmt.version(e["to_version"])
                if e["from_version"] is None
                else f"{fmt.version(e['from_version'])} → {fmt.version(e['to_version'])}",
            }
            for e in events[::-1]
        ]
    )
    df["action"] = df["action"].map(fmt.words)
    df["policy_verdict"] = df["policy_verdict"].map(fmt.words)
    df["evidence"] = df["evidence_sha256"].map(lambda x: fmt.short_id(x, 12))
    st.dataframe(
        df[
            [
                "id",
                "at",
                "action",
                "alias",
                "change",
                "actor",
                "reason",
                "policy_verdict",
                "evidence",
            ]
        ],
        hide_index=True,
        column_config={
            "id": wb.number_column("event", "#%d"),
            "at": wb.time_column("when"),
            "reason": st.column_config.TextColumn("reason", width="medium"),
            "policy_verdict": st.column_config.TextColumn("policy verdict"),
            "evidence": st.column_config.TextColumn(
                "evidence sha256", help="The frozen evidence bundle's hash (first 12 digits)."
            ),
        },
    )


def done(message: str) -> None:
    """Show ``message`` after a rerun, so the page (champion, candidates, history) already
    reflects the decision."""
    st.session_state["promotions-done"] = message
    st.rerun()


def body() -> None:
    wb.title("Promotions")
    pid = wb.project_id()
    if message := st.session_state.pop("promotions-done", None):
        st.success(message)
    lead = wb.can(Role.ML_LEAD)
    with wb.session() as s:
        named = {a: v.version for a, v in registry.aliases(session=s, project_id=pid).items()}
        versions = [v.version for v in registry.list_versions(session=s, project_id=pid)]
    if "champion" in named:
        st.write(f"Champion: **v{named['champion']}**")
    else:
        st.info(
            "No champion yet: nothing is served. Approve a candidate below, or run "
            "`quarkflow demo-bootstrap DIR` for the demo model."
            if versions
            else "No champion yet, and no model version is registered: to register one, "
            f"{next_version()}."
        )
    candidates = [v for v in versions if v != named.get("champion")]
    if not candidates and versions:
        st.info(
            f"No candidate: {fmt.version(named.get('champion'))} is the only version. "
            f"To propose another, {next_version()}."
        )
    if candidates:
        default = named.get("challenger", candidates[-1])
        pick = st.selectbox(
            "Candidate",
            candidates,
            index=candidates.index(default),
            format_func=lambda n: (
                f"v{n}" + (" (challenger)" if n == named.get("challenger") else "")
            ),
        )
        with wb.session() as s, st.spinner("comparing with the champion…"):
            p = registry.propose(
                session=s,
                storage=wb.storage(),
                ref=pick,
                cache_root=registry.model_cache_dir(),
                config=registry.PolicyConfig.for_project(session=s, project_id=pid),
                project_id=pid,
            )
        wb.policy_verdict(p.policy)
        comp = p.evidence.get("comparison") or {}
        if comp:
            st.caption(
                f"{evidence_line(comp)}; evidence sha256 {fmt.short_id(p.evidence_sha256, 12)}…"
            )
        if lead:
            with st.form("decide"):
                reason = st.text_area("Reason (kept for ever)", key="reason")
                override = st.checkbox(
                    "Override a failing policy (needs 20+ characters of reason)", value=False
                )
                c1, c2 = st.columns(2)
                approve = c1.form_submit_button("Approve", type="primary")
                reject = c2.form_submit_button("Reject")
            if approve or reject:
                try:
                    with wb.session() as s:
                        if approve:
                            ev = registry.approve(
                                session=s,
                                storage=wb.storage(),
                                version=pick,
                                user=wb.db_user(s),
                                reason=reason,
                                cache_root=registry.model_cache_dir(),
                                override=override,
                                config=registry.PolicyConfig.for_project(session=s, project_id=pid),
                                project_id=pid,
                            )
                        else:
                            ev = registry.reject(
                                session=s,
                                version=pick,
                                user=wb.db_user(s),
                                reason=reason,
                                project_id=pid,
                            )
                except QuarkflowError as exc:  # refused: say why, keep the rest of the page
                    st.error(exc.detail)
                else:
                    done(
                        f"{ev.action.value}: recorded (event #{ev.id}); "
                        "serving follows within seconds."
                    )
    if lead and "champion" in named:
        with st.form("rollback"):
            to = st.selectbox(
                "Roll back to",
                ["previous champion", *[v for v in versions if v != named["champion"]]],
                format_func=lambda x: x if isinstance(x, str) else f"v{x}",
            )
            reason_rb = st.text_input("Reason for the rollback")
            rb = st.form_submit_button("Roll back")
        if rb:
            try:
                with wb.session() as s:
                    ev = registry.rollback(
                        session=s,
                        storage=wb.storage(),
                        user=wb.db_user(s),
                        reason=reason_rb,
                        to=None if isinstance(to, str) else to,
                        project_id=pid,
                    )
            except QuarkflowError as exc:
                st.error(exc.detail)
            else:
                done(f"rolled back (event #{ev.id}): see the history below")
    if not lead:
        st.info("Read-only: approving, rejecting and rolling back need the ml_lead role.")
    with wb.session() as s:
        events = [
            registry.event_dict(session=s, event=e)
            for e in registry.history(session=s, project_id=pid)
        ]
    st.subheader("History")
    if events:
        history_table(events)
    else:
        st.info(
            "No promotion yet: every approve, reject and rollback lands here with who, when, "
            "why and the evidence's hash."
        )


wb.guarded(body)

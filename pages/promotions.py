"""Promotions: the challenger's evidence and policy verdict; Approve / Reject / Roll back for
an ML lead (reason required); the full history. Others see it read-only."""

import pandas as pd
import streamlit as st

from app import wb
from quarkflow_core import registry
from quarkflow_core.schema import Role


def body() -> None:
    st.title("Promotions")
    lead = wb.has_role(Role.ML_LEAD)
    with wb.session() as s:
        named = {a: v.version for a, v in registry.aliases(session=s).items()}
        versions = [v.version for v in registry.list_versions(session=s)]
    st.write(f"Champion: **v{named['champion']}**" if "champion" in named else "No champion yet.")
    candidates = [v for v in versions if v != named.get("champion")]
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
                cache_root=wb.settings().data_dir / "model-cache",
                config=registry.PolicyConfig.from_settings(wb.settings()),
            )
        verdict = p.policy.verdict
        (st.success if p.policy.passed else st.warning)(f"Policy: {verdict}")
        for check in p.policy.checks:
            st.write(
                ("✅ " if check["passed"] else "❌ ") + f"**{check['name']}**: {check['detail']}"
            )
        comp = p.evidence.get("comparison") or {}
        if comp:
            st.caption(
                f"hold-out accuracy v{comp['a']['version']} {comp['accuracy_a']:.4f} -> "
                f"v{comp['b']['version']} {comp['accuracy_b']:.4f}; "
                f"evidence sha256 {p.evidence_sha256[:12]}…"
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
                with wb.session() as s:
                    if approve:
                        ev = registry.approve(
                            session=s,
                            storage=wb.storage(),
                            version=pick,
                            user=wb.db_user(s),
                            reason=reason,
                            cache_root=wb.settings().data_dir / "model-cache",
                            override=override,
                            config=registry.PolicyConfig.from_settings(wb.settings()),
                        )
                    else:
                        ev = registry.reject(
                            session=s, version=pick, user=wb.db_user(s), reason=reason
                        )
                    st.success(
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
            with wb.session() as s:
                ev = registry.rollback(
                    session=s,
                    storage=wb.storage(),
                    user=wb.db_user(s),
                    reason=reason_rb,
                    to=None if isinstance(to, str) else to,
                )
            st.success(f"rolled back (event #{ev.id}): see the history below")
    if not lead:
        st.info("Read-only: approving, rejecting and rolling back need the ml_lead role.")
    with wb.session() as s:
        events = [registry.event_dict(session=s, event=e) for e in registry.history(session=s)]
    st.subheader("History")
    if events:
        st.dataframe(pd.DataFrame(events[::-1]), hide_index=True)


wb.guarded(body)

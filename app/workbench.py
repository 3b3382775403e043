"""The Streamlit workbench: `quarkflow workbench --port 8501`. Sign in with a Quarkflow user;
pick a project in the sidebar (``default`` first; ``?project=NAME`` in a link opens that one);
each role, in that project, sees the pages it may use. Pages are thin: they call
quarkflow_core for the current project (``wb.project_id()``) and render."""

from __future__ import annotations

import sys
from pathlib import Path

import streamlit as st

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `streamlit run app/workbench.py` from anywhere
    sys.path.insert(0, str(ROOT))

from app import wb  # noqa: E402
from quarkflow_core.errors import AuthenticationFailed  # noqa: E402
from quarkflow_core.schema import Role  # noqa: E402

st.set_page_config(page_title="Quarkflow workbench", layout="wide")


def sign_in() -> None:
    st.title("Quarkflow workbench")
    with st.form("sign-in"):
        username = st.text_input("User name")
        password = st.text_input("Password", type="password")
        submitted = st.form_submit_button("Sign in")
    if submitted:
        from quarkflow_core.users import authenticate_password

        try:
            with wb.session() as s:
                u = authenticate_password(session=s, username=username, password=password)
                st.session_state["user"] = {"username": u.username, "role": u.role.value}
            st.rerun()
        except AuthenticationFailed as exc:
            st.error(f"{exc.detail}. Ask an admin for an account (`quarkflow users create`).")


def page(name: str, title: str, icon: str) -> st.Page:
    return st.Page(str(ROOT / "pages" / f"{name}.py"), title=title, icon=icon, url_path=name)


user = wb.user()
if user is None:
    login = st.Page(sign_in, title="Sign in", icon=":material/login:")
    st.navigation([login], position="hidden").run()
else:
    with st.sidebar:
        wb.project_picker()  # before the pages: the role that counts is the project's
    pages = [
        page("overview", "Overview", ":material/monitoring:"),
        page("predictions", "Predictions", ":material/image:"),
    ]
    if wb.can(Role.ANALYST, Role.ML_LEAD):
        pages += [
            page("review", "Review queue", ":material/rate_review:"),
            page("datasets", "Datasets", ":material/dataset:"),
            page("training", "Training runs", ":material/model_training:"),
            page("compare", "Model comparison", ":material/compare:"),
            page("simulator", "Loop simulator", ":material/insights:"),
        ]
    pages.append(page("promotions", "Promotions", ":material/rocket_launch:"))
    with st.sidebar:
        role = wb.role() or user["role"]
        st.caption(f"Signed in as **{user['username']}** ({role})")
        if st.button("Sign out"):
            st.session_state.pop("user")
            st.rerun()
    st.navigation(pages).run()

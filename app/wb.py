"""What every workbench page shares: cached engine and storage, the signed-in user, the
filter sidebar, and turning core errors into st.error with what to do."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import streamlit as st
from sqlalchemy.orm import Session

from quarkflow_core.analytics import Filters
from quarkflow_core.errors import QuarkflowError
from quarkflow_core.schema import Role

RANGES = {"last 24 hours": 1, "last 7 days": 7, "last 30 days": 30, "all time": None}


@st.cache_resource
def _engine(url: str):
    from quarkflow_core.database import make_engine

    return make_engine(url)


def settings():
    from quarkflow_core.config import get_settings

    return get_settings()


def storage():
    from quarkflow_core.storage import get_storage

    return get_storage()


@contextmanager
def session() -> Iterator[Session]:
    with Session(_engine(settings().database_url), expire_on_commit=False) as s:
        yield s


def user() -> dict[str, Any] | None:
    return st.session_state.get("user")


def has_role(*roles: Role) -> bool:
    u = user()
    return bool(u) and (u["role"] in {r.value for r in roles} or u["role"] == Role.ADMIN.value)


def db_user(s: Session):
    from quarkflow_core.users import get_user

    return get_user(session=s, username=user()["username"])


def guarded(fn: Callable[[], Any]) -> Any:
    """Run a page body; a core error becomes st.error with the reason, never a traceback."""
    try:
        return fn()
    except QuarkflowError as exc:
        st.error(f"{exc.detail}")
    return None


def filters(s: Session, *, key: str) -> Filters:
    from sqlalchemy import select

    from quarkflow_core.schema import ModelVersion

    with st.sidebar:
        st.subheader("Filters")
        span = st.selectbox("Time range", list(RANGES), index=1, key=f"{key}-range")
        versions = list(s.scalars(select(ModelVersion.version).order_by(ModelVersion.version)))
        version = st.selectbox(
            "Model version", ["all", *versions], key=f"{key}-version", format_func=str
        )
        from quarkflow_core.review import project_classes

        try:
            classes = project_classes(session=s)
        except QuarkflowError:
            classes = []
        label = st.selectbox("Predicted class", ["all", *classes], key=f"{key}-class")
    days = RANGES[span]
    start = datetime.now(UTC) - timedelta(days=days) if days else None
    return Filters(
        start=start,
        model_version=None if version == "all" else int(version),
        label=None if label == "all" else label,
    )

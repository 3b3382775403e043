"""What every workbench page shares: cached engine and storage, the signed-in user, the
current project (the sidebar's picker, kept in the session and in the URL's ``?project=``),
the user's role in it, the filter sidebar, table columns formatted for people, the "nothing
here yet" hints, and turning core errors into st.error with what to do."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import streamlit as st
from sqlalchemy.orm import Session

from quarkflow_core import formatting as fmt
from quarkflow_core.analytics import Filters
from quarkflow_core.errors import QuarkflowError
from quarkflow_core.schema import DEFAULT_PROJECT, DEFAULT_PROJECT_ID, Role

RANGES = {"last 24 hours": 1, "last 7 days": 7, "last 30 days": 30, "all time": None}
PROJECT_PARAM = "project"  # the URL's query parameter: links keep the project
PROJECT_STATE = "project"  # st.session_state: the current project's dict (projects.project_dict)
_PICKER = "project-picker"  # the sidebar picker's widget key: the current project's name
_COUNT = "project-count"  # how many projects there are (a single one needs no caption)


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
    """``database.session_scope`` on the cached engine: a page's block is one transaction,
    committed when it ends, rolled back when it raises."""
    from quarkflow_core.database import session_scope

    with session_scope(_engine(settings().database_url)) as s:
        yield s


def user() -> dict[str, Any] | None:
    return st.session_state.get("user")


# --------------------------------------------------------------------------- projects


def _keep_in_url() -> None:
    """The picker's on_change: the URL follows the choice before the rerun reads it back."""
    st.query_params[PROJECT_PARAM] = st.session_state[_PICKER]


def project_picker() -> dict[str, Any]:
    """The sidebar's "Project" picker (call it inside ``st.sidebar``): the project named in the
    URL (``?project=birds``, so a shared link opens it), else the one picked earlier in this
    session, else ``default``. Writes the choice back to the URL and the session; returns the
    current project (``projects.project_dict``)."""
    from quarkflow_core import projects

    with session() as s:
        rows = {p.name: projects.project_dict(p) for p in projects.list_projects(session=s)}
    if not rows:  # a database from before projects: everything is the default project
        rows = {DEFAULT_PROJECT: {"id": DEFAULT_PROJECT_ID, "name": DEFAULT_PROJECT, "title": None}}
    asked = st.query_params.get(PROJECT_PARAM)
    # the last run's project: a widget's state is dropped when a page switch interrupts a run
    # before the picker was drawn again (a slow page), the session's plain copy is not
    kept = (st.session_state.get(PROJECT_STATE) or {}).get("name")
    if asked in rows:
        st.session_state[_PICKER] = asked
    elif st.session_state.get(_PICKER) not in rows:
        st.session_state[_PICKER] = (
            kept
            if kept in rows
            else DEFAULT_PROJECT
            if DEFAULT_PROJECT in rows
            else next(iter(rows))
        )
    name = st.selectbox(
        "Project",
        list(rows),
        key=_PICKER,
        on_change=_keep_in_url,
        help="Each project has its own images, models, champion, review queue and runs.",
    )
    if asked and asked not in rows:
        st.warning(f"No project {asked!r}: showing {name}.")
    if st.query_params.get(PROJECT_PARAM) != name:
        st.query_params[PROJECT_PARAM] = name
    st.session_state[PROJECT_STATE] = rows[name]
    st.session_state[_COUNT] = len(rows)
    return rows[name]


def project() -> dict[str, Any]:
    """The current project (``projects.project_dict``): what the sidebar's picker says; the
    default project before the picker has run."""
    current = st.session_state.get(PROJECT_STATE)
    if current is None:
        return {"id": DEFAULT_PROJECT_ID, "name": DEFAULT_PROJECT, "title": None}
    return current


def project_id() -> int:
    return int(project()["id"])


def is_detection() -> bool:
    """Whether the current project's models find boxes (task type "detection"): its pages
    draw boxes and speak mAP where a classification project's show a label and accuracy."""
    return project().get("task_type") == "detection"


def command(args: str) -> str:
    """A CLI command for the current project: ``quarkflow --project birds ARGS`` (just
    ``quarkflow ARGS`` in the default project), for the "what to do next" hints."""
    name = project()["name"]
    return f"quarkflow {args}" if name == DEFAULT_PROJECT else f"quarkflow --project {name} {args}"


def title(text: str) -> None:
    """A page's title; under it, which project it shows (when there is more than one)."""
    st.title(text)
    if st.session_state.get(_COUNT, 1) > 1:
        p = project()
        named = f" ({p['title']})" if p.get("title") else ""
        st.caption(f"Project **{p['name']}**{named}")


def role() -> Role | None:
    """The signed-in user's role in the current project: a grant there, else their role as at
    sign-in (``projects.role_in``); ``None`` when nobody is signed in."""
    from sqlalchemy import select

    from quarkflow_core.projects import role_in
    from quarkflow_core.schema import User

    u = user()
    if not u:
        return None
    with session() as s:
        uid = s.scalar(select(User.id).where(User.username == u["username"]))
        return role_in(session=s, project_id=project_id(), user_id=uid, role=Role(u["role"]))


def can(*roles: Role) -> bool:
    """Whether the signed-in user's role in the current project (``role``) may do what
    ``roles`` may: for showing pages and forms only. The core checks the role in the database
    again, and audits a refusal, when the action runs (``users.authorize``)."""
    from quarkflow_core.users import can as role_can

    return role_can(role(), roles)


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
    """The sidebar's filters over the current project's predictions (its versions and classes;
    each project keeps its own choice of version and class)."""
    from quarkflow_core.registry import list_versions
    from quarkflow_core.review import project_classes

    pid = project_id()
    with st.sidebar:
        st.subheader("Filters")
        span = st.selectbox("Time range", list(RANGES), index=1, key=f"{key}-range")
        versions = [v.version for v in list_versions(session=s, project_id=pid)]
        version = st.selectbox(
            "Model version",
            ["all", *versions],
            key=f"{key}-{pid}-version",
            format_func=lambda v: v if v == "all" else fmt.version(v),
        )
        try:
            classes = project_classes(session=s, project_id=pid)
        except QuarkflowError:
            classes = []
        label = st.selectbox(
            "Predicted class (top box)" if is_detection() else "Predicted class",
            ["all", *classes],
            key=f"{key}-{pid}-class",
            help="A detection's class is its most confident shown box's."
            if is_detection()
            else None,
        )
    days = RANGES[span]
    start = datetime.now(UTC) - timedelta(days=days) if days else None
    return Filters(
        start=start,
        model_version=None if version == "all" else int(version),
        label=None if label == "all" else label,
    )


def no_predictions_hint(total_ever: int) -> str:
    """What to do when a page has no predictions to show: send some, or widen the filters."""
    if total_ever == 0:
        conf = settings()
        api = (conf.public_api_url or conf.api_url or "http://127.0.0.1:8000").rstrip("/")
        name = project()["name"]
        if name != DEFAULT_PROJECT:
            return (
                f"No predictions in project {name} yet: open the demo at [{api}/demo]({api}/demo),"
                f" pick {name} and upload an image, or POST images to "
                f"`{api}/api/v1/projects/{name}/predictions` (the project needs a champion "
                "first: see Promotions). They show up here within seconds."
            )
        return (
            f"No predictions yet: open the demo at [{api}/demo]({api}/demo) and upload a digit, "
            f"or POST images to `{api}/api/v1/predictions` (`make demo` sends a few hundred "
            "unseen digits on its first start). They show up here within seconds."
        )
    return (
        f"None of the {total_ever:,} predictions match these filters: widen the time range "
        "or set model version and predicted class back to 'all' in the sidebar."
    )


# --------------------------------------------------------------------------- table columns
# st.dataframe columns that show numbers and times the way quarkflow_core.formatting does.


def time_column(label: str) -> Any:
    """A timestamp, "29 Nov 2026, 21:54", in UTC (say so in the label)."""
    return st.column_config.DatetimeColumn(
        f"{label} (UTC)", format=fmt.TABLE_TIME_FORMAT, timezone="UTC"
    )


def confidence_column(label: str = "confidence") -> Any:
    """A fraction in [0, 1] as a bar with its percentage."""
    return st.column_config.ProgressColumn(label, format="percent", min_value=0.0, max_value=1.0)


def number_column(label: str, format_: str = "%,d") -> Any:
    """A count with thousands separators, or another printf format ("#%d" for ids)."""
    return st.column_config.NumberColumn(label, format=format_)


@st.cache_data(max_entries=4096, show_spinner=False)
def image(storage_key: str) -> bytes:
    """An image's bytes from storage; keys are content hashes, so caching never goes stale."""
    return storage().get(storage_key)


@st.cache_data(max_entries=4096, show_spinner=False)
def thumbnail(storage_key: str) -> str:
    """An image as a data URI, for st.column_config.ImageColumn."""
    import base64

    ext = storage_key.rsplit(".", 1)[-1].lower() if "." in storage_key else "png"
    mime = {"jpg": "jpeg", "jpeg": "jpeg", "webp": "webp", "gif": "gif"}.get(ext, "png")
    return f"data:image/{mime};base64,{base64.b64encode(image(storage_key)).decode()}"


# --------------------------------------------------------------------------- boxes (detection)


@st.cache_data(max_entries=1024, show_spinner=False)
def boxed(storage_key: str, boxes: list[dict] | None, **options: Any) -> bytes:
    """An image from storage with ``boxes`` drawn (PNG bytes), cached on the image and the
    boxes; ``options`` go to ``detection.draw.draw_boxes`` (colour_by, truth, only_shown...)."""
    from quarkflow_core.detection.draw import draw_boxes, png_bytes

    return png_bytes(draw_boxes(image(storage_key), boxes, **options))


@st.cache_data(max_entries=4096, show_spinner=False)
def boxed_thumbnail(storage_key: str, boxes: list[dict] | None, side: int = 96) -> str:
    """An image with its shown boxes drawn, small, as a data URI (st.column_config.ImageColumn)."""
    import base64

    from quarkflow_core.detection.draw import draw_boxes, png_bytes

    img = draw_boxes(image(storage_key), boxes, labels=False, min_side=side * 2)
    img.thumbnail((side * 2, side * 2))
    return f"data:image/png;base64,{base64.b64encode(png_bytes(img)).decode()}"


@st.cache_data(max_entries=256, show_spinner=False)
def compared(
    storage_key: str,
    boxes_a: list[dict],
    boxes_b: list[dict],
    titles: tuple[str, str],
    truth: list[dict] | None = None,
) -> bytes:
    """One image twice, side by side, with two versions' boxes (``draw.compare_boxes``)."""
    from quarkflow_core.detection.draw import compare_boxes, png_bytes

    return png_bytes(
        compare_boxes(image(storage_key), boxes_a, boxes_b, titles=titles, truth=truth)
    )


# --------------------------------------------------------------------------- policy

# Material icons (shipped with Streamlit) render where no emoji font is installed.
CHECK_ICON = {True: ":green[:material/check_circle:]", False: ":red[:material/cancel:]"}
INFO_ICON = ":blue[:material/info:]"  # the power statement informs; it never fails


def policy_verdict(policy: Any) -> None:
    """A policy verdict (``registry.PolicyVerdict``): pass / fail, then each check with its
    reason (the power statement as information: it never fails)."""
    (st.success if policy.passed else st.warning)(f"Policy: {policy.verdict}")
    for check in policy.checks:
        icon = INFO_ICON if check["name"] == "power" else CHECK_ICON[bool(check["passed"])]
        st.markdown(f"{icon} **{fmt.words(check['name'])}**: {check['detail']}")

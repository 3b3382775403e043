"""What every flow needs from the core: settings, a database session, storage, paths, and the
project a flow run works in (every flow takes a ``project`` parameter, default ``default``)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy.orm import Session

from quarkflow_core.config import get_settings
from quarkflow_core.database import get_engine, session_scope
from quarkflow_core.storage import Storage, get_storage


@contextmanager
def db() -> Iterator[Session]:
    with session_scope(get_engine(get_settings().database_url)) as session:
        yield session


def storage() -> Storage:
    return get_storage()


def storage_at(url: str | None) -> Storage:
    """The storage at ``url`` (file:// or gs://, through the emulator when one is set), or
    QF_STORAGE_URL's when ``url`` is None."""
    from quarkflow_core.storage import storage_from_url

    if not url:
        return get_storage()
    settings = get_settings()
    return storage_from_url(
        url, emulator_host=settings.storage_emulator_host, project=settings.gcs_project
    )


def data_dir() -> Path:
    return Path(get_settings().data_dir)


EVERY_PROJECT = "*"  # the scheduled runs' parameter: one pass over every project


def each_project(project: str | int | None) -> list[tuple[int, str]]:
    """(id, name) of the project a run names, or of every project for ``"*"``."""
    from quarkflow_core.projects import get_project, list_projects

    with db() as s:
        if project == EVERY_PROJECT:
            return [(p.id, p.name) for p in list_projects(session=s)]
        row = get_project(session=s, ref=project)
        return [(row.id, row.name)]


def project_name(project_id: int) -> str:
    from quarkflow_core.projects import get_project

    with db() as s:
        return get_project(session=s, ref=project_id).name


def resolve_project(project: str | int | None) -> int:
    """The id of the project a flow run names (``None`` or ``""``: the default project); an
    unknown name fails the run with NotFound naming the projects."""
    from quarkflow_core.projects import get_project

    with db() as s:
        return get_project(session=s, ref=project).id

"""Object storage behind one interface: a local folder (``file://``) or GCS (``gs://``).

Writes are atomic: locally a temp file in the same filesystem is fsynced and then linked or
renamed into place; on GCS an object only exists once its upload is finalized, and create-only
writes use ``if_generation_match=0``. A crash mid-write therefore never leaves a partial object.

One backend per module: ``base`` (the ``Storage`` interface, key rules, ``PutResult``),
``local`` (``LocalStorage``), ``gcs`` (``GCSStorage``). Callers import from
``quarkflow_core.storage`` and get a backend from ``storage_from_url`` / ``get_storage``.
"""

from __future__ import annotations

from functools import lru_cache
from urllib.parse import urlsplit

from quarkflow_core.errors import StorageError
from quarkflow_core.storage.base import CHUNK, PutResult, Storage, content_key, validate_key
from quarkflow_core.storage.gcs import GCSStorage
from quarkflow_core.storage.local import LocalStorage

__all__ = [
    "CHUNK",
    "GCSStorage",
    "LocalStorage",
    "PutResult",
    "Storage",
    "content_key",
    "get_storage",
    "storage_from_url",
    "validate_key",
]


def storage_from_url(
    url: str, *, emulator_host: str | None = None, project: str = "quarkflow"
) -> Storage:
    parts = urlsplit(url)
    if parts.scheme == "file":
        return LocalStorage(parts.netloc + parts.path)
    if parts.scheme == "gs":
        return GCSStorage(
            parts.netloc, parts.path.strip("/"), project=project, emulator_host=emulator_host
        )
    raise StorageError(f"QF_STORAGE_URL: unknown scheme {parts.scheme!r} in {url!r}")


@lru_cache(maxsize=4)
def _cached(url: str, emulator_host: str | None, project: str) -> Storage:
    return storage_from_url(url, emulator_host=emulator_host, project=project)


def get_storage() -> Storage:
    """The storage named by QF_STORAGE_URL (cached)."""
    from quarkflow_core.config import get_settings

    s = get_settings()
    return _cached(s.storage_url, s.storage_emulator_host, s.gcs_project)

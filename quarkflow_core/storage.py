"""Object storage behind one interface: a local folder (``file://``) or GCS (``gs://``).

Writes are atomic: locally a temp file in the same filesystem is fsynced and then linked or
renamed into place; on GCS an object only exists once its upload is finalized, and create-only
writes use ``if_generation_match=0``. A crash mid-write therefore never leaves a partial object.
"""

from __future__ import annotations

import hashlib
import io
import os
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import BinaryIO
from urllib.parse import quote, urlsplit

from quarkflow_core.errors import InvalidInput, ObjectNotFound, StorageError

CHUNK = 1024 * 1024
_TMP_DIR = ".tmp"


def validate_key(key: str) -> str:
    """Keys are relative, slash-separated, with no '..' or empty parts (no path escapes)."""
    if not isinstance(key, str) or not key or len(key) > 1024:
        raise InvalidInput(f"invalid storage key {key!r}: must be 1-1024 characters")
    parts = key.split("/")
    if (
        key.startswith("/")
        or "\\" in key
        or "\x00" in key
        or any(p in ("", ".", "..") for p in parts)
    ):
        raise InvalidInput(f"invalid storage key {key!r}: relative path without '.', '..' or '//'")
    if parts[0] == _TMP_DIR:
        raise InvalidInput(f"invalid storage key {key!r}: {_TMP_DIR}/ is reserved")
    return key


def _chunks(data: bytes | BinaryIO) -> Iterator[bytes]:
    if isinstance(data, bytes | bytearray | memoryview):
        yield bytes(data)
        return
    while True:
        chunk = data.read(CHUNK)
        if not chunk:
            return
        yield chunk


@dataclass(frozen=True)
class PutResult:
    key: str
    created: bool  # False when create-only and the object already existed
    size: int


class Storage(ABC):
    """put / get / exists / list / delete / open_url over string keys."""

    url: str

    @abstractmethod
    def put(
        self,
        key: str,
        data: bytes | BinaryIO,
        *,
        content_type: str | None = None,
        overwrite: bool = True,
    ) -> PutResult:
        """Write atomically. With ``overwrite=False`` an existing object is left untouched."""

    @abstractmethod
    def get(self, key: str) -> bytes: ...

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def list(self, prefix: str = "") -> Iterator[str]:
        """Keys under ``prefix`` in lexical order."""

    @abstractmethod
    def delete(self, key: str) -> bool:
        """Remove; True when something was removed."""

    @abstractmethod
    def open_url(self, key: str, *, expires_s: int = 3600) -> str:
        """A URL a browser or Label Studio can fetch the object from."""

    @abstractmethod
    def check(self) -> None:
        """Raise StorageError naming QF_STORAGE_URL when the backend is unreachable."""

    def prepare(self) -> None:
        """Make a new deployment's storage usable (`quarkflow init`): create what is missing,
        then check it. A local folder is created by ``check`` itself."""
        self.check()

    def put_content_addressed(
        self, data: bytes, *, prefix: str = "images", ext: str = "", content_type: str | None = None
    ) -> tuple[str, PutResult]:
        """Store under ``prefix/ab/<sha256>[.ext]``: the same bytes are stored once."""
        sha = hashlib.sha256(data).hexdigest()
        key = content_key(sha, prefix=prefix, ext=ext)
        return sha, self.put(key, data, content_type=content_type, overwrite=False)


def content_key(sha256: str, *, prefix: str = "images", ext: str = "") -> str:
    suffix = f".{ext.lower().lstrip('.')}" if ext else ""
    return f"{prefix}/{sha256[:2]}/{sha256}{suffix}"


# --------------------------------------------------------------------------- local folder


class LocalStorage(Storage):
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()
        self.url = f"file://{self.root}"

    def _path(self, key: str) -> Path:
        return self.root / validate_key(key)

    def put(self, key, data, *, content_type=None, overwrite=True) -> PutResult:
        path = self._path(key)
        if not overwrite and path.exists():
            return PutResult(key, False, path.stat().st_size)
        tmp_dir = self.root / _TMP_DIR
        try:
            tmp_dir.mkdir(parents=True, exist_ok=True)
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(
                f"QF_STORAGE_URL: cannot create folders under {self.root}: {exc}"
            ) from exc
        tmp = tmp_dir / f"{uuid.uuid4().hex}.part"
        size = 0
        try:
            with open(tmp, "xb") as fh:
                for chunk in _chunks(data):
                    fh.write(chunk)
                    size += len(chunk)
                fh.flush()
                os.fsync(fh.fileno())
            if overwrite:
                os.replace(tmp, path)
            else:
                try:
                    os.link(tmp, path)  # create-only, atomic
                except FileExistsError:
                    return PutResult(key, False, path.stat().st_size)
            _fsync_dir(path.parent)
            return PutResult(key, True, size)
        except OSError as exc:
            raise StorageError(f"could not write {key!r} under {self.root}: {exc}") from exc
        finally:
            tmp.unlink(missing_ok=True)

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError):
            raise ObjectNotFound(f"no object {key!r} in {self.url}") from None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str = "") -> Iterator[str]:
        if not self.root.is_dir():
            return iter(())
        keys = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            rel_dir = Path(dirpath).relative_to(self.root)
            if rel_dir == Path("."):
                dirnames[:] = [d for d in dirnames if d != _TMP_DIR]
            for name in filenames:
                key = (rel_dir / name).as_posix() if rel_dir != Path(".") else name
                if key.startswith(prefix):
                    keys.append(key)
        return iter(sorted(keys))

    def delete(self, key: str) -> bool:
        try:
            self._path(key).unlink()
            return True
        except FileNotFoundError:
            return False

    def open_url(self, key: str, *, expires_s: int = 3600) -> str:
        path = self._path(key)
        if not path.is_file():
            raise ObjectNotFound(f"no object {key!r} in {self.url}")
        return path.as_uri()

    def check(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / _TMP_DIR
            probe.mkdir(exist_ok=True)
            if not os.access(probe, os.W_OK):
                raise PermissionError("not writable")
        except OSError as exc:
            raise StorageError(f"QF_STORAGE_URL: folder {self.root} is not usable: {exc}") from exc

    def sweep_temp(self, older_than_s: float = 3600) -> int:
        """Remove temp files left by crashed writers; returns how many."""
        tmp_dir = self.root / _TMP_DIR
        if not tmp_dir.is_dir():
            return 0
        cutoff = time.time() - older_than_s
        removed = 0
        for part in tmp_dir.glob("*.part"):
            if part.stat().st_mtime < cutoff:
                part.unlink(missing_ok=True)
                removed += 1
        return removed


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- Google Cloud Storage


class GCSStorage(Storage):
    """GCS bucket + optional prefix. Honours STORAGE_EMULATOR_HOST (fake-gcs-server)."""

    RESUMABLE_CHUNK = 256 * 1024 * 4  # 1 MiB; streams larger than this upload resumably

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        project: str = "quarkflow",
        emulator_host: str | None = None,
        timeout_s: float = 10.0,
    ) -> None:
        self.bucket_name = bucket
        self.prefix = prefix.strip("/")
        self.project = project
        self.emulator_host = emulator_host.rstrip("/") if emulator_host else None
        self.timeout = timeout_s
        self.url = f"gs://{bucket}/{self.prefix}" if self.prefix else f"gs://{bucket}"
        self._client = None

    # The client is built lazily: no network at construction.
    @property
    def client(self):
        if self._client is None:
            from google.cloud import storage as gcs

            if self.emulator_host:
                from google.auth.credentials import AnonymousCredentials

                self._client = gcs.Client(
                    project=self.project,
                    credentials=AnonymousCredentials(),
                    client_options={"api_endpoint": self.emulator_host},
                )
            else:
                self._client = gcs.Client(project=self.project)
        return self._client

    @property
    def bucket(self):
        return self.client.bucket(self.bucket_name)

    def _name(self, key: str) -> str:
        validate_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _retry(self):
        from google.cloud.storage.retry import DEFAULT_RETRY

        return DEFAULT_RETRY.with_timeout(self.timeout)

    def _wrap(self, action: str, key: str, exc: Exception) -> StorageError:
        """ObjectNotFound only for a missing *object*; a write that finds no bucket (deleted,
        not yet recreated) is an outage like any other StorageError, never a missing record."""
        from google.api_core import exceptions as gexc

        if isinstance(exc, gexc.NotFound) and action != "writing":
            return ObjectNotFound(f"no object {key!r} in {self.url}")
        if isinstance(exc, gexc.NotFound):
            return StorageError(
                f"QF_STORAGE_URL: bucket {self.bucket_name!r} not found while writing {key!r} "
                f"(deleted? `quarkflow init` recreates it): {exc}"
            )
        return StorageError(f"QF_STORAGE_URL: {action} {key!r} in {self.url} failed: {exc}")

    def put(self, key, data, *, content_type=None, overwrite=True) -> PutResult:
        from google.api_core import exceptions as gexc

        name = self._name(key)
        blob = self.bucket.blob(name)
        kwargs = {} if overwrite else {"if_generation_match": 0}
        try:
            if isinstance(data, bytes | bytearray | memoryview):
                payload = bytes(data)
                blob.upload_from_string(
                    payload,
                    content_type=content_type or "application/octet-stream",
                    timeout=self.timeout,
                    retry=self._retry(),
                    **kwargs,
                )
                size = len(payload)
            else:
                blob.chunk_size = self.RESUMABLE_CHUNK
                counter = _CountingReader(data)
                blob.upload_from_file(
                    counter,
                    content_type=content_type or "application/octet-stream",
                    timeout=self.timeout,
                    retry=self._retry(),
                    **kwargs,
                )
                size = counter.count
            return PutResult(key, True, size)
        except gexc.PreconditionFailed:
            return PutResult(key, False, -1)
        except Exception as exc:
            raise self._wrap("writing", key, exc) from exc

    def get(self, key: str) -> bytes:
        try:
            return self.bucket.blob(self._name(key)).download_as_bytes(
                timeout=self.timeout, retry=self._retry()
            )
        except Exception as exc:
            raise self._wrap("reading", key, exc) from exc

    def exists(self, key: str) -> bool:
        try:
            return self.bucket.blob(self._name(key)).exists(
                timeout=self.timeout, retry=self._retry()
            )
        except Exception as exc:
            raise self._wrap("checking", key, exc) from exc

    def list(self, prefix: str = "") -> Iterator[str]:
        if ".." in prefix.split("/") or prefix.startswith("/"):
            raise InvalidInput(f"invalid storage prefix {prefix!r}")
        base = f"{self.prefix}/" if self.prefix else ""
        full, strip = base + prefix, len(base)
        try:
            names = [
                b.name[strip:]
                for b in self.client.list_blobs(
                    self.bucket_name, prefix=full, timeout=self.timeout, retry=self._retry()
                )
            ]
        except Exception as exc:
            raise self._wrap("listing", prefix, exc) from exc
        return iter(sorted(names))

    def delete(self, key: str) -> bool:
        from google.api_core import exceptions as gexc

        try:
            self.bucket.blob(self._name(key)).delete(timeout=self.timeout, retry=self._retry())
            return True
        except gexc.NotFound:
            return False
        except Exception as exc:
            raise self._wrap("deleting", key, exc) from exc

    def open_url(self, key: str, *, expires_s: int = 3600) -> str:
        name = self._name(key)
        if self.emulator_host:
            return (
                f"{self.emulator_host}/storage/v1/b/{self.bucket_name}/o/"
                f"{quote(name, safe='')}?alt=media"
            )
        from datetime import timedelta

        try:
            return self.bucket.blob(name).generate_signed_url(
                version="v4", expiration=timedelta(seconds=expires_s), method="GET"
            )
        except (AttributeError, TypeError, ValueError) as exc:
            raise StorageError(
                f"QF_STORAGE_URL: cannot sign a URL for {key!r}: the GCS credentials in use "
                f"cannot sign ({exc}); use a service-account key or IAM signBlob permission"
            ) from exc

    def check(self) -> None:
        try:
            exists = self.bucket.exists(timeout=self.timeout, retry=self._retry())
        except Exception as exc:
            raise StorageError(f"QF_STORAGE_URL: cannot reach {self.url}: {exc}") from exc
        if not exists:
            raise StorageError(f"QF_STORAGE_URL: bucket {self.bucket_name!r} does not exist")

    def prepare(self) -> None:
        self.ensure_bucket()  # it has just checked, or created, the bucket

    def ensure_bucket(self) -> None:
        """Create the bucket when missing (the emulator, first-time setup). An existing bucket
        needs only read access to its metadata (storage.buckets.get), not create rights."""
        from google.api_core import exceptions as gexc

        try:
            if self.bucket.exists(timeout=self.timeout, retry=self._retry()):
                return
            self.client.create_bucket(self.bucket_name, timeout=self.timeout)
        except gexc.Conflict:
            pass
        except Exception as exc:
            raise StorageError(
                f"QF_STORAGE_URL: cannot check or create bucket {self.bucket_name!r}: {exc}"
            ) from exc


class _CountingReader(io.RawIOBase):
    def __init__(self, inner: BinaryIO) -> None:
        self.inner = inner
        self.count = 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        chunk = self.inner.read(size)
        self.count += len(chunk)
        return chunk

    def tell(self) -> int:
        return self.count


# --------------------------------------------------------------------------- factory


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

"""Google Cloud Storage (``gs://``): an object exists only once its upload is finalized;
create-only writes use ``if_generation_match=0``. The SDK is imported on first use."""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import BinaryIO
from urllib.parse import quote

from quarkflow_core.errors import InvalidInput, ObjectNotFound, StorageError
from quarkflow_core.storage.base import PutResult, Storage, validate_key


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

"""The storage interface every backend implements, and what they share: key rules, the
streaming reader, content-addressed keys."""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

from quarkflow_core.errors import InvalidInput

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

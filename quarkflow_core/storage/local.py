"""A local folder (``file://``): a temp file in the same filesystem, fsynced, then renamed
(overwrite) or hard-linked (create-only) into place."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from quarkflow_core.errors import ObjectNotFound, StorageError
from quarkflow_core.storage.base import _TMP_DIR, PutResult, Storage, _chunks, validate_key


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

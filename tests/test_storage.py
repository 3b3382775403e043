"""One storage interface, two real backends: a local folder and fake-gcs-server."""

import hashlib
import io
import signal
import subprocess
import sys
import textwrap
import urllib.request

import pytest

from quarkflow_core.errors import InvalidInput, ObjectNotFound, StorageError
from quarkflow_core.storage import GCSStorage, LocalStorage, storage_from_url

pytestmark = pytest.mark.integration


def test_put_get_exists_list_delete(storage):
    assert not storage.exists("a/b.txt")
    res = storage.put("a/b.txt", b"hello", content_type="text/plain")
    assert res.created and res.size == 5
    storage.put("a/c.txt", b"world")
    storage.put("z.txt", b"!")
    assert storage.get("a/b.txt") == b"hello"
    assert storage.exists("a/b.txt")
    assert list(storage.list("a/")) == ["a/b.txt", "a/c.txt"]
    assert list(storage.list()) == ["a/b.txt", "a/c.txt", "z.txt"]
    assert storage.delete("a/b.txt") is True
    assert storage.delete("a/b.txt") is False
    assert not storage.exists("a/b.txt")
    with pytest.raises(ObjectNotFound, match=r"a/b\.txt"):
        storage.get("a/b.txt")


def test_overwrite_and_create_only(storage):
    storage.put("k", b"one")
    storage.put("k", b"two")  # overwrite is the default
    assert storage.get("k") == b"two"
    res = storage.put("k", b"three", overwrite=False)
    assert res.created is False
    assert storage.get("k") == b"two"


def test_content_addressed_same_bytes_one_blob(storage):
    data = b"\x89PNG fake but stable bytes"
    sha1, r1 = storage.put_content_addressed(data, ext="png")
    sha2, r2 = storage.put_content_addressed(data, ext="png")
    assert sha1 == sha2 == hashlib.sha256(data).hexdigest()
    assert r1.created and not r2.created
    assert list(storage.list("images/")) == [f"images/{sha1[:2]}/{sha1}.png"]


def test_streamed_put_of_several_chunks(storage):
    payload = bytes(range(256)) * 12_000  # ~3 MiB: resumable upload on GCS
    res = storage.put("big/blob.bin", io.BytesIO(payload))
    assert res.size == len(payload)
    assert storage.get("big/blob.bin") == payload


def test_open_url_serves_the_bytes(storage):
    storage.put("u/img.png", b"pixels")
    url = storage.open_url("u/img.png")
    with urllib.request.urlopen(url, timeout=5) as resp:  # file:// or the emulator's http://
        assert resp.read() == b"pixels"


@pytest.mark.parametrize("key", ["", "/abs", "../escape", "a/../../b", "a//b", "a\\b", ".tmp/x"])
def test_hostile_keys_are_refused(storage, key):
    with pytest.raises(InvalidInput):
        storage.put(key, b"x")


class _Exploding(io.RawIOBase):
    """A stream that dies after handing out some data: a writer crashing mid-upload."""

    def __init__(self, good_bytes: int) -> None:
        self.left = good_bytes

    def readable(self):
        return True

    def read(self, size=-1):
        if self.left <= 0:
            raise ConnectionResetError("client went away mid-upload")
        n = min(self.left, size if size and size > 0 else self.left)
        self.left -= n
        return b"x" * n


def test_failure_mid_write_leaves_no_object(storage):
    with pytest.raises((StorageError, ConnectionResetError)):
        storage.put("crash/obj.bin", _Exploding(3 * 1024 * 1024))
    assert not storage.exists("crash/obj.bin")
    assert list(storage.list("crash/")) == []


KILL_CHILD = textwrap.dedent("""
    import io, sys, time
    from quarkflow_core.storage import GCSStorage, LocalStorage

    class Stall(io.RawIOBase):
        sent = 0
        def readable(self): return True
        def read(self, size=-1):
            if self.sent >= 3 * 1024 * 1024:
                print("stalled", flush=True)
                time.sleep(600)
            n = 1024 * 1024 if size is None or size < 0 else min(size, 1024 * 1024)
            self.sent += n
            return b"y" * n

    kind, where, prefix, host = sys.argv[1:5]
    store = (LocalStorage(where) if kind == "local"
             else GCSStorage(where, prefix, emulator_host=host))
    store.put("crash/killed.bin", Stall())
""")


def test_kill_9_mid_write_leaves_no_partial_object(storage, gcs_host):
    """A real crash: SIGKILL the writing process after 3 MiB have gone out."""
    if isinstance(storage, LocalStorage):
        args = ["local", str(storage.root), "-", "-"]
    else:
        assert isinstance(storage, GCSStorage)
        args = ["gcs", storage.bucket_name, storage.prefix, gcs_host]
    child = subprocess.Popen(
        [sys.executable, "-c", KILL_CHILD, *args], stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout.readline().strip() == "stalled"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
    assert child.returncode == -signal.SIGKILL
    assert not storage.exists("crash/killed.bin")
    assert list(storage.list("crash/")) == []
    if isinstance(storage, LocalStorage):
        # the half-written temp file exists (the crash really was mid-write) and is swept
        assert storage.sweep_temp(older_than_s=-1) == 1


def test_unreachable_gcs_is_one_clear_error():
    store = GCSStorage("bucket", emulator_host="http://127.0.0.1:9", timeout_s=1)
    with pytest.raises(StorageError, match="QF_STORAGE_URL: cannot reach gs://bucket"):
        store.check()


def test_missing_bucket_is_named(gcs_host):
    store = GCSStorage("qf-does-not-exist", emulator_host=gcs_host, timeout_s=5)
    with pytest.raises(StorageError, match="bucket 'qf-does-not-exist' does not exist"):
        store.check()


def test_storage_from_url(tmp_path):
    assert isinstance(storage_from_url(f"file://{tmp_path}"), LocalStorage)
    gcs = storage_from_url("gs://bkt/a/b", emulator_host="http://h:1")
    assert isinstance(gcs, GCSStorage) and gcs.bucket_name == "bkt" and gcs.prefix == "a/b"
    with pytest.raises(StorageError, match="unknown scheme"):
        storage_from_url("ftp://x")

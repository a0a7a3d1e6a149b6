"""BlobStore: content-addressed, idempotent, nothing partial left behind."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from storage.blobs import SYNCFS_MIN_KERNEL, TMP_PREFIX, BlobStore, load_syncfs


def test_put_is_content_addressed_with_one_level_fanout(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "blobs")
    data = b"From: a@example.org\r\n\r\nhi\r\n"
    sha = store.put(data)
    assert sha == hashlib.sha256(data).hexdigest()
    assert store.path(sha) == tmp_path / "blobs" / sha[:2] / sha
    assert store.get(sha) == data and store.exists(sha)


def test_put_twice_is_idempotent_and_leaves_no_temp_files(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    first = store.put(b"same")
    mtime = store.path(first).stat().st_mtime_ns
    assert store.put(b"same") == first
    assert store.path(first).stat().st_mtime_ns == mtime  # not rewritten
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert files == [store.path(first)]


def test_empty_blob_and_distinct_contents(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    keys = {store.put(b""), store.put(b"a"), store.put(b"b")}
    assert len(keys) == 3
    assert store.get(hashlib.sha256(b"").hexdigest()) == b""


def test_bad_keys_are_rejected_and_missing_blobs_raise(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    with pytest.raises(ValueError):
        store.path("../../etc/passwd")
    with pytest.raises(ValueError):
        store.path("A" * 64)
    with pytest.raises(FileNotFoundError):
        store.get("0" * 64)
    assert not store.exists("0" * 64)


def test_staged_blob_is_invisible_until_published_then_durable_under_its_name(
    tmp_path: Path,
) -> None:
    store = BlobStore(tmp_path / "blobs")
    data = b"staged message bytes\r\n"
    staged = store.stage(data)
    assert staged is not None
    assert staged.sha256 == hashlib.sha256(data).hexdigest()
    assert staged.tmp_path.read_bytes() == data
    assert staged.tmp_path.name.startswith(TMP_PREFIX)
    assert not store.exists(staged.sha256)  # nothing final before publish
    store.publish([staged])
    assert store.get(staged.sha256) == data
    assert not staged.tmp_path.exists()
    store.publish([staged])  # idempotent: already published
    assert store.stage(data) is None  # already stored: nothing written


def test_publish_of_a_blob_stored_meanwhile_drops_the_temporary_file(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "blobs")
    staged = store.stage(b"twice")
    assert staged is not None
    store.put(b"twice")
    store.publish([staged])
    assert store.get(staged.sha256) == b"twice"
    assert not staged.tmp_path.exists()


def test_publish_of_a_vanished_staged_blob_raises(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "blobs")
    staged = store.stage(b"gone")
    assert staged is not None
    staged.tmp_path.unlink()
    with pytest.raises(FileNotFoundError):
        store.publish([staged])


def test_discard_staged_removes_what_a_crashed_process_left(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "blobs")
    kept = store.put(b"kept")
    left = [store.stage(b"left %d" % i) for i in range(3)]
    assert all(blob is not None for blob in left)
    assert store.discard_staged() == 3
    assert store.get(kept) == b"kept"
    assert not any(p.name.startswith(TMP_PREFIX) for p in (tmp_path / "blobs").rglob("*"))


@pytest.mark.parametrize("use_syncfs", [None, False])
def test_put_many_stores_each_payload_once_in_order(
    tmp_path: Path, use_syncfs: bool | None
) -> None:
    store = BlobStore(tmp_path / "blobs", use_syncfs=use_syncfs)
    existing = store.put(b"already here")
    payloads = [b"one", b"two", b"one", b"already here", b""]
    keys = store.put_many(payloads)
    assert keys == [hashlib.sha256(p).hexdigest() for p in payloads]
    assert keys[3] == existing
    assert [store.get(k) for k in keys] == payloads
    leftovers = [p for p in (tmp_path / "blobs").rglob("*") if p.name.startswith(TMP_PREFIX)]
    assert leftovers == []
    assert store.put_many([]) == []


def test_syncfs_is_used_where_it_reports_errors(tmp_path: Path) -> None:
    """Linux >= 5.8 (this machine's kind): put_many syncs the filesystem, not each file."""
    available = load_syncfs()
    release = tuple(int(p) for p in os.uname().release.split(".")[:2])
    if os.uname().sysname == "Linux" and release >= SYNCFS_MIN_KERNEL:
        assert available is not None
        store = BlobStore(tmp_path / "blobs", use_syncfs=True)
        assert store.put_many([b"a", b"b"]) == [
            hashlib.sha256(b"a").hexdigest(),
            hashlib.sha256(b"b").hexdigest(),
        ]
    else:
        assert available is None
        with pytest.raises(OSError):
            BlobStore(tmp_path / "blobs", use_syncfs=True)

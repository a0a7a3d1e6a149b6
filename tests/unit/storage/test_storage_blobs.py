"""BlobStore: content-addressed, idempotent, nothing partial left behind."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from storage.blobs import BlobStore


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

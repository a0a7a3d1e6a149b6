"""Content-addressed file store for raw RFC 5322 messages and attachment payloads.

Edge module: blocking file I/O. From async code call it through
``asyncio.to_thread``. Knows nothing of the database: a blob written for a
transaction that then rolls back is a harmless orphan (same bytes, same
name), never a dangling reference.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar, cast

_SHA256_HEX = re.compile(r"[0-9a-f]{64}")

T = TypeVar("T")
R = TypeVar("R")

FSYNC_THREADS = 8
"""Threads a ``BlobStore`` uses to fsync a published batch's files in parallel."""

TMP_PREFIX = ".tmp-"
"""Name prefix of a blob not yet published (never referenced by a row)."""


def sha256_of(data: bytes) -> str:
    """Return the blob key of ``data``: its SHA-256 as 64 lowercase hex digits."""
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True, slots=True, kw_only=True)
class StagedBlob:
    """A blob written to a temporary file by ``BlobStore.stage``, not yet durable.

    Attributes:
        sha256: its key (lowercase hex).
        tmp_path: the temporary file, in the blob's fan-out directory.
        new_directory: whether staging created that fan-out directory.
    """

    sha256: str
    tmp_path: Path
    new_directory: bool


class BlobWriter(Protocol):
    """What ``storage.repos`` needs to store a blob: ``put(data) -> sha256`` (durable on return
    or, for a batch writer, durable before its transaction commits)."""

    def put(self, data: bytes) -> str:
        """Store ``data`` and return its SHA-256 (lowercase hex)."""
        ...


class BlobStore:
    """Bytes stored under their lowercase hex SHA-256 at ``root/ab/<sha256>``.

    One level of 256 fan-out directories, as git's object store: the
    directories are created once, so a new blob costs two fsyncs (file and
    directory). Two levels (65,536 directories) made almost every blob create
    a directory and cost four fsyncs (measured with bench/bench_smtp.py).

    Invariant: a file at a final path is complete and fsynced, and its
    content hashes to its name (written to a temp file in the same
    directory, fsynced, renamed, directory fsynced: POSIX rename(2) is atomic).

    Args:
        root: directory of the store; created on first ``put``.
        use_syncfs: how ``put_many`` makes a batch durable: True syncfs(2)
            (raises OSError where unavailable), False one fsync per file and
            directory, None (default) syncfs where available.
    """

    def __init__(self, root: Path, *, use_syncfs: bool | None = None) -> None:
        self.root = Path(root)
        self._fsync_pool: ThreadPoolExecutor | None = None
        self._syncfs = load_syncfs() if use_syncfs is not False else None
        if use_syncfs and self._syncfs is None:
            raise OSError("syncfs(2) with error reporting needs Linux 5.8 or later")

    def path(self, sha256: str) -> Path:
        """Return where the blob ``sha256`` lives (whether or not it exists).

        Raises:
            ValueError: ``sha256`` is not 64 lowercase hex digits.
        """
        if not _SHA256_HEX.fullmatch(sha256):
            raise ValueError("blob key must be 64 lowercase hex digits")
        return self.root / sha256[:2] / sha256

    def put(self, data: bytes) -> str:
        """Store ``data`` durably and return its SHA-256 (lowercase hex).

        Idempotent: when the blob already exists nothing is written.

        Raises:
            OSError: disk full, permissions; nothing partial is left visible.
        """
        sha256 = sha256_of(data)
        staged = self._stage(data, sha256)
        if staged is not None:
            self.publish((staged,))
        return sha256

    def stage(self, data: bytes) -> StagedBlob | None:
        """Write ``data`` to a temporary file beside its final path, without fsync.

        The first half of a group write (``publish`` is the second): stage
        every blob of a batch cheaply, then make them all durable with one
        ``publish`` call, run while the database works on the same batch.

        Returns:
            The staged blob, or None when the blob already exists (nothing written).

        Raises:
            OSError: disk full, permissions; the temporary file is removed.
        """
        return self._stage(data, sha256_of(data))

    def _stage(self, data: bytes, sha256: str) -> StagedBlob | None:
        final = self.path(sha256)
        if final.exists():
            return None
        new_directory = not final.parent.is_dir()
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=final.parent, prefix=TMP_PREFIX)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise
        return StagedBlob(sha256=sha256, tmp_path=Path(tmp_name), new_directory=new_directory)

    def publish(self, staged: Iterable[StagedBlob]) -> None:
        """Make staged blobs durable under their final names (fsync, rename, directory fsync).

        The files are fsynced (in parallel when there are several: the
        filesystem journal then commits them together — a batch of ten
        took 1.9 ms instead of 3.1–3.7 ms one after another on this VM),
        then renamed (POSIX rename(2) is atomic), then each fan-out
        directory touched is fsynced once (also in parallel), and the root
        once when a fan-out directory was created. Idempotent: a blob already
        published (its temporary file gone, its final file present) is
        skipped, and a temporary file whose blob appeared meanwhile is removed.

        Raises:
            FileNotFoundError: a staged blob has neither its temporary nor its
                final file (removed by someone else); stage it again.
            OSError: disk full, I/O error; files not yet renamed stay temporary.
        """
        pending: list[tuple[StagedBlob, Path]] = []
        for blob in staged:
            final = self.path(blob.sha256)
            if not blob.tmp_path.exists():
                if final.exists():
                    continue
                raise FileNotFoundError(f"staged blob {blob.sha256} is gone")
            if final.exists():
                blob.tmp_path.unlink(missing_ok=True)
                continue
            pending.append((blob, final))
        self._fsync_all([blob.tmp_path for blob, _ in pending])
        self._rename(pending)

    def put_many(self, payloads: Sequence[bytes], keys: Sequence[str] | None = None) -> list[str]:
        """Store several blobs durably at once; return their SHA-256 keys, in order.

        What a group-commit batch uses. On Linux ≥ 5.8: each missing blob is
        written to its temporary file, one syncfs(2) makes them all durable,
        they are renamed, and a second syncfs makes the renames durable —
        two calls for the whole batch, and no thread. syncfs flushes every
        dirty page of the data directory's filesystem, ours or not, and
        reports write-back errors since Linux 5.8 (docs/storage.md).
        Elsewhere: each file is written and fsynced on the fsync threads,
        all in parallel (the filesystem then commits them together), then
        renamed, then each directory touched is fsynced once. Equivalent to
        ``put`` on each payload.

        Args:
            payloads: the blobs' bytes.
            keys: their SHA-256 keys when the caller already has them (a
                message's and its attachments' are computed by the parser);
                None computes them.

        Raises:
            OSError: disk full, I/O error; nothing partial is left under a final name.
            ValueError: ``keys`` and ``payloads`` differ in length.
        """
        keys = list(keys) if keys is not None else [sha256_of(data) for data in payloads]
        missing = {key: data for key, data in zip(keys, payloads, strict=True)}
        missing = {key: data for key, data in missing.items() if not self.path(key).exists()}
        if not missing:
            return keys
        if self._syncfs is not None:
            written = [self._stage(data, key) for key, data in missing.items()]
            self._sync_filesystem(self._syncfs)
            for blob in written:
                if blob is not None:
                    os.replace(blob.tmp_path, self.path(blob.sha256))
            self._sync_filesystem(self._syncfs)
            return keys
        staged = self._map(self._stage_synced, list(missing.items()))
        self._rename([(blob, self.path(blob.sha256)) for blob in staged if blob is not None])
        return keys

    def _sync_filesystem(self, syncfs: Callable[[int], int]) -> None:
        """syncfs(2) on the store's filesystem.

        Raises:
            OSError: the kernel reported a write-back error.
        """
        fd = os.open(self.root, os.O_RDONLY)
        try:
            if syncfs(fd) != 0:
                errno = ctypes.get_errno()
                raise OSError(errno, f"syncfs: {os.strerror(errno)}", str(self.root))
        finally:
            os.close(fd)

    def _stage_synced(self, item: tuple[str, bytes]) -> StagedBlob | None:
        sha256, data = item
        blob = self._stage(data, sha256)
        if blob is not None:
            _fsync_path(blob.tmp_path)
        return blob

    def _rename(self, pending: list[tuple[StagedBlob, Path]]) -> None:
        """Rename fsynced temporary files to their final names; fsync their directories once."""
        for blob, final in pending:
            os.replace(blob.tmp_path, final)
        directories = sorted({final.parent for _, final in pending})
        if any(blob.new_directory for blob, _ in pending):
            directories.append(self.root)  # the fan-out directory's own entry
        self._fsync_all(directories)

    def _fsync_all(self, paths: list[Path]) -> None:
        """fsync every path (file or directory); several at once on the fsync threads."""
        self._map(_fsync_path, paths)

    def _map(self, fn: Callable[[T], R], items: list[T]) -> list[R]:
        """``[fn(x) for x in items]``, on the fsync threads when there are several.

        Raises:
            Exception: the first one ``fn`` raised (after all calls ended).
        """
        if len(items) <= 1:
            return [fn(item) for item in items]
        if self._fsync_pool is None:
            self._fsync_pool = ThreadPoolExecutor(
                max_workers=FSYNC_THREADS, thread_name_prefix="mailgate-fsync"
            )
        return list(self._fsync_pool.map(fn, items))

    def discard_staged(self) -> int:
        """Remove temporary files left by a crashed process; return how many.

        Call at start-up, before anything stages or puts blobs (a temporary
        file is never referenced by a row: rows are committed only after
        ``publish``).
        """
        removed = 0
        for tmp in self.root.glob(f"*/{TMP_PREFIX}*"):
            tmp.unlink(missing_ok=True)
            removed += 1
        return removed

    def get(self, sha256: str) -> bytes:
        """Return the bytes of blob ``sha256``.

        Raises:
            FileNotFoundError: no such blob.
            ValueError: malformed key.
        """
        return self.path(sha256).read_bytes()

    def exists(self, sha256: str) -> bool:
        """Return whether blob ``sha256`` is stored."""
        return self.path(sha256).is_file()


SYNCFS_MIN_KERNEL = (5, 8)
"""syncfs(2) reports write-back errors only since Linux 5.8 (syncfs(2), NOTES)."""


def load_syncfs() -> Callable[[int], int] | None:
    """Return libc's ``syncfs(fd) -> 0 | -1`` when it reports errors here, else None.

    Linux ≥ 5.8 with a C library that exports it (glibc ≥ 2.14, musl);
    Python 3.11's ``os`` has no wrapper, so it is called through ctypes.
    """
    uname = os.uname()
    if uname.sysname != "Linux":
        return None
    try:
        version = tuple(int(part) for part in uname.release.split(".")[:2])
    except ValueError:
        return None
    if version < SYNCFS_MIN_KERNEL:
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).syncfs
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int]
    function.restype = ctypes.c_int
    return cast(Callable[[int], int], function)


def _fsync_path(path: Path) -> None:
    """fsync(2) a file or a directory, by path."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

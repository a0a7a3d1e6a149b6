"""Content-addressed file store for raw RFC 5322 messages and attachment payloads.

Edge module: blocking file I/O. From async code call it through
``asyncio.to_thread``. Knows nothing of the database: a blob written for a
transaction that then rolls back is a harmless orphan (same bytes, same
name), never a dangling reference.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from pathlib import Path

_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


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
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

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
        sha256 = hashlib.sha256(data).hexdigest()
        final = self.path(sha256)
        if final.exists():
            return sha256
        new_dirs = not final.parent.is_dir()
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=final.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp_name, final)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise
        _fsync_dir(final.parent)
        if new_dirs:  # the fan-out directory's own entry must be durable too
            _fsync_dir(self.root)
        return sha256

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


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

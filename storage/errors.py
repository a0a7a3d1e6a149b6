"""Errors raised by storage repositories for broken caller promises.

Data problems in mail are never raised here (they become sync-log rows);
these two mean "the thing you named does not exist" and "the thing you
want to create already exists". Anything else escaping ``storage`` is an
I/O failure of the database or the blob store.
"""

from __future__ import annotations


class StorageError(ValueError):
    """Base of the repository errors; ``code`` is a stable machine name.

    Args:
        message: human-readable text (no mail bodies, no secrets).
        code: short fixed name for API error bodies, e.g. ``not_found``.
    """

    default_code = "storage_error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code or self.default_code


class NotFound(StorageError):
    """A referenced sub-account, user, contact or membership does not exist."""

    default_code = "not_found"


class Conflict(StorageError):
    """The row to create already exists (a unique name or address is taken)."""

    default_code = "conflict"

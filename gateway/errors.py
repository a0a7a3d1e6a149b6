"""Exception classes of the edge (STYLE.md §7).

Exceptions mean a broken promise: a bug or an I/O failure. Data problems
are sync-log rows, not exceptions. Each adapter turns third-party errors
into these three in one ``classify`` function.
"""

from __future__ import annotations


class TransientError(Exception):
    """Retry later: the network, the database or a provider hiccuped."""


class PermanentError(Exception):
    """Give up on this item (quarantine it, log it) and go on."""


class AuthError(Exception):
    """The provider rejected our credentials: the mailbox needs re-authorisation (R22)."""


def classify(exc: BaseException) -> type[Exception]:
    """Return the edge error class an exception from the database or disk belongs to.

    Args:
        exc: any exception raised while storing a message.

    Returns:
        ``TransientError`` for I/O and connection failures (OSError,
        SQLAlchemy ``OperationalError``/``InterfaceError``, timeouts),
        ``PermanentError`` for everything else.
    """
    if isinstance(exc, TransientError | AuthError | PermanentError):
        return type(exc)
    if isinstance(exc, OSError | TimeoutError | ConnectionError):
        return TransientError
    name = type(exc).__name__
    if name in {"OperationalError", "InterfaceError", "DisconnectionError"}:
        return TransientError
    return PermanentError

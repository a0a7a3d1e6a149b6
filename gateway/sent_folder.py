"""The Sent folder of a mailbox, for the outbound queue: APPEND a copy (R18), find a copy.

Edge module, blocking: imapclient over one short connection per call; call
these functions through ``asyncio.to_thread``. It does not watch folders
(``gateway/imap`` does) and never logs credentials.
"""

from __future__ import annotations

import imaplib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TypeVar

from imapclient import IMAPClient
from imapclient import imapclient as imap_constants

from gateway.config import Security
from gateway.errors import TransientError
from gateway.smtp.sender import tls_context

T = TypeVar("T")

TIMEOUT_SECONDS = 30.0


@dataclass(frozen=True, slots=True, kw_only=True)
class ImapAccess:
    """How to log in to a mailbox's IMAP server.

    Attributes:
        token: an OAuth2 access token (XOAUTH2), or None to use ``password``.
    """

    host: str
    port: int
    security: Security
    ca_file: Path | None
    username: str
    token: str | None = None
    password: str | None = None


class NoSentFolder(LookupError):
    """The server has no \\Sent special-use folder (RFC 6154) nor a usual Sent name."""


def _open(access: ImapAccess) -> IMAPClient:
    context = tls_context(access.ca_file)
    client = IMAPClient(
        access.host,
        port=access.port,
        ssl=access.security == Security.TLS,
        ssl_context=context,
        timeout=TIMEOUT_SECONDS,
    )
    if access.security == Security.STARTTLS:
        client.starttls(context)
    if access.token is not None:
        client.oauth2_login(access.username, access.token)
    else:
        client.login(access.username, access.password or "")
    return client


def _sent_folder(client: IMAPClient) -> str:
    # RFC 6154 SPECIAL-USE first, then imapclient's list of usual names
    # ("Sent", "Sent Items", "[Gmail]/Sent Mail", …).
    folder = client.find_special_folder(imap_constants.SENT)
    if folder is None:
        raise NoSentFolder("no \\Sent folder")
    return str(folder)


def _session(access: ImapAccess, work: Callable[[IMAPClient], T]) -> T:
    """Log in, run ``work``, log out; IMAP and socket errors become ``TransientError``."""
    try:
        client = _open(access)
        try:
            return work(client)
        finally:
            try:
                client.logout()
            except (imaplib.IMAP4.error, OSError):
                pass  # the answer is in; a failed LOGOUT changes nothing
    except (imaplib.IMAP4.error, OSError) as exc:  # imapclient's errors subclass IMAP4.error
        raise TransientError(f"IMAP: {type(exc).__name__}: {exc}") from exc


def append_sent_copy(access: ImapAccess, content: bytes, date_at: datetime) -> str:
    """APPEND ``content`` to the \\Sent folder with \\Seen (R18); return the folder name.

    RFC 9051 §6.3.12; the folder is found as ``_sent_folder`` does.

    Raises:
        NoSentFolder: the server has none (a ``LookupError``).
        TransientError: login, APPEND or the connection failed (an
            imapclient/imaplib error, ``OSError``, a timeout); the APPEND
            may or may not have been done.
    """

    def append(client: IMAPClient) -> str:
        folder = _sent_folder(client)
        client.append(folder, content, flags=(imap_constants.SEEN,), msg_time=date_at)
        return folder

    return _session(access, append)


def sent_copy_exists(access: ImapAccess, message_id: str) -> bool | None:
    """Return whether the \\Sent folder holds a message with this Message-ID header.

    Uses ``UID SEARCH HEADER Message-ID`` (RFC 9051 §6.4.4), substring match
    on the id without brackets.

    Returns:
        True (found), False (not there), or None when the server has no
        \\Sent folder (RFC 6154) nor a usual Sent name: it cannot tell.

    Raises:
        TransientError: login, SELECT, SEARCH or the connection failed.
    """

    def search(client: IMAPClient) -> bool | None:
        try:
            folder = _sent_folder(client)
        except NoSentFolder:
            return None
        client.select_folder(folder, readonly=True)
        return bool(client.search(["HEADER", "Message-ID", message_id]))

    return _session(access, search)

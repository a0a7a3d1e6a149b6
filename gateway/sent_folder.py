"""The Sent folder of a mailbox, for the outbound queue: APPEND a copy (R18), find a copy.

Edge module, blocking: imapclient over one short connection per call; call
these functions through ``asyncio.to_thread``. It does not watch folders
(``gateway/imap`` does) and never logs credentials.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from imapclient import IMAPClient
from imapclient import imapclient as imap_constants

from gateway.config import Security
from gateway.smtp.sender import tls_context

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


def append_sent_copy(access: ImapAccess, content: bytes, date_at: datetime) -> str:
    """APPEND ``content`` to the \\Sent folder with \\Seen (R18); return the folder name.

    Raises:
        NoSentFolder: the server has none.
        imapclient/OS errors: the connection failed (transient).
    """
    client = _open(access)
    try:
        folder = _sent_folder(client)
        client.append(folder, content, flags=(imap_constants.SEEN,), msg_time=date_at)
        return folder
    finally:
        client.logout()


def sent_copy_exists(access: ImapAccess, message_id: str) -> bool:
    """Return whether the \\Sent folder holds a message with this Message-ID header.

    Uses ``UID SEARCH HEADER Message-ID`` (RFC 9051 §6.4.4), substring match
    on the id without brackets.

    Raises:
        NoSentFolder: the server has none.
        imapclient/OS errors: the connection failed (transient).
    """
    client = _open(access)
    try:
        client.select_folder(_sent_folder(client), readonly=True)
        return bool(client.search(["HEADER", "Message-ID", message_id]))
    finally:
        client.logout()

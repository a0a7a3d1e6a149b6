"""SMTP submission of one composed message: through the user's mailbox or the relay.

Edge module: one short-lived aiosmtplib connection per call. It does not
decide routes or retries (``gateway.outbound`` does) and never logs tokens
or passwords.

Session::

    connect (implicit TLS | plain → STARTTLS, CA = system + ca_file)
      → EHLO → AUTH XOAUTH2 (535 → refresh the token once → AUTH again)
               | AUTH PLAIN/LOGIN (password) | none (relay without user)
      → MAIL FROM → RCPT TO … → DATA → 250 (reply parsed) → QUIT

Errors are turned into ``TransientError`` / ``PermanentError`` /
``AuthError`` by ``classify`` (STYLE.md §7).
"""

from __future__ import annotations

import re
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import aiosmtplib

from gateway.config import Security
from gateway.errors import AuthError, PermanentError, TransientError
from ingest.types import MessageId

TIMEOUT_SECONDS = 60.0
AUTH_FAILED = 535
# Exchange Online: "250 2.6.0 <NEW@host> [InternalId=…] Queued mail for delivery".
_REPLY_MESSAGE_ID = re.compile(r"<([^<>\s@]+@[^<>\s@]+)>")

TokenSource = Callable[[bool], Awaitable[str]]
"""``token(force_refresh)`` → an OAuth2 access token for XOAUTH2."""


@dataclass(frozen=True, slots=True, kw_only=True)
class SmtpServer:
    """Where and how to connect (``providers.*.smtp_*`` or ``[relay]``)."""

    host: str
    port: int
    security: Security
    ca_file: Path | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class OAuthLogin:
    """AUTH XOAUTH2 as ``username`` with tokens from ``token``."""

    username: str
    token: TokenSource


@dataclass(frozen=True, slots=True, kw_only=True)
class PasswordLogin:
    """AUTH PLAIN or LOGIN (whichever the server offers) with a password."""

    username: str
    password: str


Login = OAuthLogin | PasswordLogin | None


@dataclass(frozen=True, slots=True, kw_only=True)
class SubmitResult:
    """The server's answer to DATA.

    Attributes:
        code: the reply code (250).
        reply: the reply text (no code).
        provider_message_id: a Message-ID named in the reply (Exchange
            rewrites ours, R11) when it differs from ours, else None.
    """

    code: int
    reply: str
    provider_message_id: MessageId | None


def tls_context(ca_file: Path | None) -> ssl.SSLContext:
    """Return a verifying client context: system CAs plus ``ca_file`` (never unverified)."""
    context = ssl.create_default_context()
    if ca_file is not None:
        context.load_verify_locations(cafile=str(ca_file))
    return context


class ClientContexts:
    """Verifying client TLS contexts, one per CA file, shared by every send.

    Building a context loads the system CA store: 18 ms per send measured
    with bench/bench_send.py, the largest cost of a submission. A client
    context is safe to share between connections.
    """

    def __init__(self) -> None:
        """Start empty; contexts are built on first use."""
        self._by_ca_file: dict[Path | None, ssl.SSLContext] = {}

    def get(self, ca_file: Path | None) -> ssl.SSLContext:
        """Return the shared context for ``ca_file`` (None: system CAs only)."""
        context = self._by_ca_file.get(ca_file)
        if context is None:
            context = self._by_ca_file[ca_file] = tls_context(ca_file)
        return context


def provider_message_id(reply: str, ours: MessageId) -> MessageId | None:
    """Return the Message-ID a 250 reply names when it is not ``ours``, else None.

    Exchange Online replies ``250 2.6.0 <id@host> [InternalId=…] Queued mail
    for delivery`` and files the message under that id; others name none.
    """
    match = _REPLY_MESSAGE_ID.search(reply)
    if match is None or match.group(1) == ours:
        return None
    return MessageId(match.group(1))


async def submit(
    server: SmtpServer,
    login: Login,
    *,
    envelope_sender: str,
    envelope_recipients: tuple[str, ...],
    content: bytes,
    message_id: MessageId,
    contexts: ClientContexts | None = None,
) -> SubmitResult:
    """Send ``content`` once and return the server's reply (RFC 5321 §3.3, RFC 6409).

    ``contexts`` shares TLS contexts between sends; None builds one for this send.

    Raises:
        TransientError: 4xx, timeouts, connection errors (retry later).
        PermanentError: 5xx other than an auth failure (give up).
        AuthError: the server refused the credentials even after one refresh.
    """
    client = aiosmtplib.SMTP(
        hostname=server.host,
        port=server.port,
        use_tls=server.security == Security.TLS,
        start_tls=server.security == Security.STARTTLS,
        tls_context=contexts.get(server.ca_file) if contexts else tls_context(server.ca_file),
        timeout=TIMEOUT_SECONDS,
    )
    try:
        await client.connect()
        await _authenticate(client, login)
        errors, reply = await client.sendmail(envelope_sender, envelope_recipients, content)
        await _quit(client)
    except Exception as exc:
        client.close()
        raise classify(exc)(_describe(exc)) from exc
    if errors:
        refused = ", ".join(f"{r}: {c} {m}" for r, (c, m) in errors.items())
        reply = f"{reply} (refused: {refused})"
    return SubmitResult(
        code=250, reply=reply, provider_message_id=provider_message_id(reply, message_id)
    )


async def _authenticate(client: aiosmtplib.SMTP, login: Login) -> None:
    if isinstance(login, PasswordLogin):
        await client.login(login.username, login.password)
    elif isinstance(login, OAuthLogin):
        try:
            await client.auth_xoauth2(login.username, await login.token(False))
        except aiosmtplib.SMTPAuthenticationError as exc:
            if exc.code != AUTH_FAILED:
                raise
            # An expired token (Gmail: 535 5.7.8, Outlook: 535 5.7.3): refresh once.
            await client.auth_xoauth2(login.username, await login.token(True))


async def _quit(client: aiosmtplib.SMTP) -> None:
    try:
        await client.quit()
    except (aiosmtplib.SMTPException, OSError):
        client.close()  # the message is already accepted; a failed QUIT changes nothing


def classify(exc: BaseException) -> type[Exception]:
    """Return the edge error class of an exception raised while submitting.

    ``TransientError`` for 4xx replies, timeouts and connection errors;
    ``AuthError`` for 535/534/530 after AUTH; ``PermanentError`` for other
    5xx replies and anything unexpected. Our own edge errors pass through.
    """
    if isinstance(exc, TransientError | PermanentError | AuthError):
        return type(exc)
    if isinstance(exc, aiosmtplib.SMTPAuthenticationError):
        return AuthError if exc.code >= 500 else TransientError
    if isinstance(exc, aiosmtplib.SMTPRecipientsRefused):
        codes = [e.code for e in exc.recipients]
        return TransientError if codes and all(400 <= c < 500 for c in codes) else PermanentError
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        return TransientError if 400 <= exc.code < 500 else PermanentError
    if isinstance(exc, aiosmtplib.SMTPTimeoutError | TimeoutError | ConnectionError | OSError):
        return TransientError
    if isinstance(exc, aiosmtplib.SMTPServerDisconnected | aiosmtplib.SMTPConnectError):
        return TransientError
    return PermanentError


def _describe(exc: BaseException) -> str:
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        return f"{exc.code} {exc.message}"
    if isinstance(exc, aiosmtplib.SMTPRecipientsRefused):
        return "; ".join(f"{e.recipient}: {e.code} {e.message}" for e in exc.recipients)
    return f"{type(exc).__name__}: {exc}"

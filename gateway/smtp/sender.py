"""SMTP submission of one composed message: through the user's mailbox or the relay.

Edge module: a ``Submission`` owns one aiosmtplib connection, used for one
message (``submit``) or for several in a row (the queue's ``process_due``).
It does not decide routes or retries (``gateway.outbound`` does) and never
logs tokens or passwords.

Session::

    connect (implicit TLS | plain → STARTTLS, CA = system + ca_file)
      → EHLO → AUTH XOAUTH2 (535 → refresh the token once → AUTH again)
               | AUTH PLAIN/LOGIN (password) | none (relay without user)
      → { MAIL FROM (SIZE=) → RCPT TO … → DATA → 354 → content in chunks
          → "." → 250 (reply parsed) | error → RSET } …  → QUIT

DATA is streamed by ``gateway.smtp.data`` (line ends, dot-stuffing, SIZE,
flow control) rather than by aiosmtplib's ``data()``, which copies the
whole content several times.

Errors are turned into ``TransientError`` / ``PermanentError`` /
``AuthError`` by ``classify`` (STYLE.md §7), and a failure after the end
of the data was written into ``OutcomeUnknown``: the server may have
accepted the message, so it is never retried blindly.
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
from gateway.smtp.data import COMPLETED, ReplyLost, normalised_size, stream_data
from ingest.types import MessageId

TIMEOUT_SECONDS = 60.0
AUTH_FAILED = 535
# Exchange Online: "250 2.6.0 <NEW@host> [InternalId=…] Queued mail for delivery".
_REPLY_MESSAGE_ID = re.compile(r"<([^<>\s@]+@[^<>\s@]+)>")

TokenSource = Callable[[bool], Awaitable[str]]
"""``token(force_refresh)`` → an OAuth2 access token for XOAUTH2."""


class OutcomeUnknown(Exception):
    """The whole message was written but its reply was lost (timeout, dropped connection).

    Neither transient nor permanent: the server may have accepted it (RFC
    5321 §4.1.1.4), so a retry could deliver it twice. The queue settles it
    like a crash after DATA (``gateway.outbound``: the Sent folder, else
    ``outcome_unknown``).
    """


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


class Submission:
    """One SMTP connection to ``server``, logged in, that submits messages one after another.

    State: ``open()`` → connected and authenticated → ``send()`` … →
    ``close()`` (QUIT). A failed transaction is reset with RSET and the
    connection stays usable when the server's reply left it in sync;
    a timeout or a dropped connection closes it (``is_connected`` False).

    Args:
        server, login: where and how to connect.
        contexts: shared TLS contexts; None builds one for this connection.
    """

    def __init__(
        self, server: SmtpServer, login: Login, contexts: ClientContexts | None = None
    ) -> None:
        """Prepare the client; nothing is connected until ``open``."""
        self.server = server
        self.login = login
        self._client = aiosmtplib.SMTP(
            hostname=server.host,
            port=server.port,
            use_tls=server.security == Security.TLS,
            start_tls=server.security == Security.STARTTLS,
            tls_context=contexts.get(server.ca_file) if contexts else tls_context(server.ca_file),
            timeout=TIMEOUT_SECONDS,
        )

    @property
    def is_connected(self) -> bool:
        """Whether the connection is still open (it may still be closed by the server)."""
        return self._client.is_connected

    async def open(self) -> None:
        """Connect, say EHLO (and STARTTLS) and authenticate.

        Raises:
            TransientError, PermanentError, AuthError: as ``classify`` says.
        """
        try:
            await self._client.connect()
            if self._client.is_ehlo_or_helo_needed:  # no STARTTLS: EHLO now, to know SIZE
                try:
                    await self._client.ehlo()
                except aiosmtplib.SMTPHeloError:
                    await self._client.helo()
            await _authenticate(self._client, self.login)
        except Exception as exc:
            self._client.close()
            raise classify(exc)(_describe(exc)) from exc

    async def send(
        self,
        *,
        envelope_sender: str,
        envelope_recipients: tuple[str, ...],
        content: bytes,
        message_id: MessageId,
    ) -> SubmitResult:
        """Submit ``content`` once in one mail transaction (RFC 5321 §3.3, RFC 6409).

        MAIL FROM carries ``SIZE=`` when the server offers it (RFC 1870);
        the content is streamed by ``gateway.smtp.data.stream_data``.

        Returns:
            The 250 reply; ``reply`` names the refused recipients when some were.

        Raises:
            TransientError: 4xx, timeouts, connection errors before the end
                of the data (retry later).
            PermanentError: 5xx other than an auth failure (give up).
            OutcomeUnknown: the end of the data was written and no reply
                came (never retry blindly).
        """
        try:
            errors, reply = await self._transaction(envelope_sender, envelope_recipients, content)
        except Exception as exc:
            await self._after_failure(exc)
            raise classify(exc)(_describe(exc)) from exc
        if errors:
            refused = ", ".join(f"{r}: {c} {m}" for r, (c, m) in errors.items())
            reply = f"{reply} (refused: {refused})"
        return SubmitResult(
            code=COMPLETED, reply=reply, provider_message_id=provider_message_id(reply, message_id)
        )

    async def close(self) -> None:
        """Say QUIT and close; errors are ignored (every message was already answered)."""
        try:
            if self._client.is_connected:
                await self._client.quit()
        except (aiosmtplib.SMTPException, OSError):
            pass
        finally:
            self._client.close()

    async def _transaction(
        self, sender: str, recipients: tuple[str, ...], content: bytes
    ) -> tuple[dict[str, tuple[int, str]], str]:
        client = self._client
        options = [f"SIZE={normalised_size(content)}"] if client.supports_extension("size") else []
        await client.mail(sender, options=options)
        errors: dict[str, tuple[int, str]] = {}
        refusals: list[aiosmtplib.SMTPRecipientRefused] = []
        for recipient in recipients:
            try:
                await client.rcpt(recipient)
            except aiosmtplib.SMTPRecipientRefused as exc:
                refusals.append(exc)
                errors[recipient] = (exc.code, exc.message)
        if len(refusals) == len(recipients):
            raise aiosmtplib.SMTPRecipientsRefused(refusals)
        return errors, await stream_data(client, content, TIMEOUT_SECONDS)

    async def _after_failure(self, exc: Exception) -> None:
        # As aiosmtplib's sendmail: a refused transaction is reset so the
        # connection can carry the next message; anything else closes it.
        if isinstance(exc, aiosmtplib.SMTPResponseException | aiosmtplib.SMTPRecipientsRefused):
            try:
                await self._client.rset()
                return
            except (aiosmtplib.SMTPException, OSError):
                pass
        self._client.close()


class Submissions:
    """Open ``Submission``s reused across the sends of one queue run, by server and login.

    A real client keeps its session for the next message: no new TCP/TLS
    handshake, EHLO and AUTH per message (RFC 5321 §3.3 lets one session
    carry many transactions). At most ``max_open`` stay open (the least
    recently used is closed); ``close()`` ends them all with QUIT.

    Args:
        contexts: shared TLS contexts.
        max_open: connections kept open at once (≥ 1).
    """

    def __init__(self, contexts: ClientContexts, max_open: int = 4) -> None:
        """Start with no connection."""
        self._contexts = contexts
        self._max_open = max_open
        self._open: dict[tuple[SmtpServer, str | None], Submission] = {}

    async def send(
        self,
        server: SmtpServer,
        login: Login,
        *,
        envelope_sender: str,
        envelope_recipients: tuple[str, ...],
        content: bytes,
        message_id: MessageId,
    ) -> SubmitResult:
        """``Submission.send`` on the open connection for (server, login), opened when needed.

        Raises:
            TransientError, PermanentError, AuthError, OutcomeUnknown: as
                ``Submission.open``/``send``.
        """
        key = (server, None if login is None else f"{type(login).__name__}:{login.username}")
        submission = self._open.pop(key, None)
        if submission is None or not submission.is_connected:
            while len(self._open) >= self._max_open:
                await self._open.pop(next(iter(self._open))).close()
            submission = Submission(server, login, self._contexts)
            await submission.open()
        try:
            return await submission.send(
                envelope_sender=envelope_sender,
                envelope_recipients=envelope_recipients,
                content=content,
                message_id=message_id,
            )
        finally:
            if submission.is_connected:
                self._open[key] = submission  # most recently used last

    async def close(self) -> None:
        """QUIT every open connection."""
        while self._open:
            await self._open.pop(next(iter(self._open))).close()


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
    """Send ``content`` once on a connection of its own and return the server's reply.

    ``Submission`` open → send → close (RFC 5321 §3.3, RFC 6409).
    ``contexts`` shares TLS contexts between sends; None builds one for this send.

    Raises:
        TransientError: 4xx, timeouts, connection errors (retry later).
        PermanentError: 5xx other than an auth failure (give up).
        AuthError: the server refused the credentials even after one refresh.
        OutcomeUnknown: the reply to the end of the data was lost.
    """
    submission = Submission(server, login, contexts)
    await submission.open()
    try:
        return await submission.send(
            envelope_sender=envelope_sender,
            envelope_recipients=envelope_recipients,
            content=content,
            message_id=message_id,
        )
    finally:
        await submission.close()


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


def classify(exc: BaseException) -> type[Exception]:
    """Return the edge error class of an exception raised while submitting.

    ``TransientError`` for 4xx replies, timeouts and connection errors;
    ``AuthError`` for 535/534/530 after AUTH; ``OutcomeUnknown`` for a
    reply lost after the end of the data (``data.ReplyLost``);
    ``PermanentError`` for other 5xx replies and anything unexpected. Our
    own edge errors pass through.
    """
    if isinstance(exc, TransientError | PermanentError | AuthError | OutcomeUnknown):
        return type(exc)
    if isinstance(exc, ReplyLost):
        return OutcomeUnknown
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
    if isinstance(exc, ReplyLost):
        return str(exc)
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        return f"{exc.code} {exc.message}"
    if isinstance(exc, aiosmtplib.SMTPRecipientsRefused):
        return "; ".join(f"{e.recipient}: {e.code} {e.message}" for e in exc.recipients)
    return f"{type(exc).__name__}: {exc}"

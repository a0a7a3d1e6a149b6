"""One IMAP connection on aioimaplib: TLS, AUTHENTICATE XOAUTH2 / LOGIN, SELECT, UID FETCH, IDLE.

Edge module: owns exactly one socket. It never hangs: every command races
against a timeout and against the connection's end (EOF, or an untagged
BYE, RFC 9051 §7.1.5), and either ends in ``ConnectionLost``
(``TransientError``: reconnect) or ``LoginRejected`` (``AuthError``: a
fresh token, then re-authorisation). It decides nothing about folders,
checkpoints or storage (``watcher.py`` does).

States::

    opened ──greeting (+ STARTTLS)──▶ not authenticated
      ──AUTHENTICATE XOAUTH2 / LOGIN──▶ authenticated ──SELECT──▶ selected
      selected ──IDLE──▶ idling ──push / renew timer: DONE──▶ selected
      any ──BYE / EOF / timeout──▶ lost (raises ConnectionLost)
      any ──LOGOUT──▶ closed

Secrets never reach logs: aioimaplib is told to scrub the token and the
password from its DEBUG lines; this module logs neither.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from asyncio import sslproto
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any, TypeVar

from aioimaplib import aioimaplib

from gateway.config import Security
from gateway.errors import AuthError, TransientError
from gateway.imap.responses import (
    GMAIL_EXTENSION,
    FetchedMessage,
    FolderInfo,
    Line,
    SelectInfo,
    has_exists,
    is_auth_failure,
    is_bye,
    parse_fetch,
    parse_list,
    parse_search,
    parse_select,
)
from ingest.types import Uid

log = logging.getLogger(__name__)

COMMAND_TIMEOUT_SECONDS = 30.0

DONE_TIMEOUT_SECONDS = 10.0
"""Longest wait for the server's answer to DONE (at most a quarter of the renewal).

A silently dead socket (no FIN, no RST) shows itself only here: IDLE lasts
the renewal interval minus this wait, so IDLE + DONE together end within
``sync.idle_renew_seconds`` and a dead link is noticed within it (issue 4)."""
"""Longest wait for any tagged reply (a silent dead socket is noticed within this)."""

FETCH_CHUNK = 50
"""UIDs per UID FETCH command (bounds memory; a catch-up is several commands)."""

KEEPALIVE = {"TCP_KEEPIDLE": 60, "TCP_KEEPINTVL": 10, "TCP_KEEPCNT": 3}
"""TCP keepalive (seconds, probes): a dead route during IDLE ends the socket in ~90 s."""

WAKE = b"WAKE"
"""Marker ``wake`` puts in aioimaplib's IDLE queue (never sent on the wire)."""

TLS_READ_BUFFER_BYTES = 32 * 1024
"""Size of each TLS connection's socket read buffer (bytes), down from asyncio's 256 KiB.

CPython 3.11–3.13's ``asyncio.sslproto.SSLProtocol`` gives every TLS
connection a zero-filled ``bytearray(256 KiB)`` (``max_size``), resident
for the connection's life: 2,000 idle sessions would hold 500 MiB of empty
buffers. A TLS record carries at most 16 KiB (RFC 8446 §5.1), so 32 KiB
still takes two records per socket read; bulk FETCH speed is unchanged
(docs/imap.md, "Memory per session")."""

T = TypeVar("T")


class ConnectionLost(TransientError):
    """The connection ended: EOF, untagged BYE, a timeout, or a protocol error. Reconnect."""


class LoginRejected(AuthError):
    """The server answered ``NO [AUTHENTICATIONFAILED]`` (RFC 5530) to the login."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Endpoint:
    """Where and how to connect (``providers.*`` or a mailbox's ``server_settings``).

    Attributes:
        security: ``tls`` (implicit, RFC 8314), ``starttls`` (RFC 2595) or ``plain``.
        ca_file: extra trusted CA bundle (PEM); system CAs are always trusted.
        timeout_seconds: per-command timeout.
        ssl_context: a shared context from ``make_ssl_context(ca_file)``, or
            None to build one for this connection.
    """

    host: str
    port: int
    security: Security
    ca_file: Path | None = None
    timeout_seconds: float = COMMAND_TIMEOUT_SECONDS
    ssl_context: ssl.SSLContext | None = field(default=None, compare=False, repr=False)


def tls_buffer_shrink_supported() -> bool:
    """Whether this Python's asyncio TLS protocol has the buffer ``_shrink_tls_buffer`` resizes.

    True on CPython 3.11–3.13 (``asyncio.sslproto.SSLProtocol.max_size`` and
    ``get_buffer``). The supervisor logs a warning once when it is False;
    the sessions then keep asyncio's default buffer (more memory, same
    behaviour).
    """
    protocol = getattr(sslproto, "SSLProtocol", None)
    return isinstance(getattr(protocol, "max_size", None), int) and hasattr(protocol, "get_buffer")


def _shrink_tls_buffer(transport: Any, size_bytes: int | None = None) -> bool:
    """Give one TLS connection a ``size_bytes`` read buffer instead of asyncio's 256 KiB.

    Per connection and after the handshake, never a process-wide patch
    (STYLE.md §4): the instance's ``max_size`` caps what ``get_buffer``
    hands the socket transport and what ``_do_read__copied`` asks OpenSSL
    for; the old buffer is dropped. ``get_buffer`` and ``buffer_updated``
    read ``_ssl_buffer`` / ``_ssl_buffer_view`` afresh at every call, so the
    swap is safe between reads (the event loop is not inside them here).

    Returns:
        True when the buffer was replaced; False when the transport is not
        asyncio's TLS transport or its private attributes are absent
        (another Python or event loop): nothing is changed then.
    """
    size_bytes = TLS_READ_BUFFER_BYTES if size_bytes is None else size_bytes
    ssl_protocol: Any = getattr(transport, "_ssl_protocol", None)
    buffer = getattr(ssl_protocol, "_ssl_buffer", None)
    if not isinstance(buffer, bytearray) or not hasattr(ssl_protocol, "_ssl_buffer_view"):
        return False
    if not isinstance(getattr(ssl_protocol, "max_size", None), int):
        return False
    if len(buffer) > size_bytes:
        new = bytearray(size_bytes)
        ssl_protocol.max_size = size_bytes
        ssl_protocol._ssl_buffer = new
        ssl_protocol._ssl_buffer_view = memoryview(new)
    return True


def make_ssl_context(ca_file: Path | None) -> ssl.SSLContext:
    """A verifying client context (system CAs plus ``ca_file``).

    Build one per CA file and share it: each context holds its own copy of
    the CA store (~250 KiB), which would otherwise be paid per session.
    """
    return ssl.create_default_context(cafile=str(ca_file) if ca_file else None)


class _Protocol(aioimaplib.IMAP4ClientProtocol):  # type: ignore[misc]
    """aioimaplib's protocol plus: connection-end detection and the XOAUTH2 fix."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop, None)
        self.ended = asyncio.Event()
        self.logging_out = False
        self.exists_seen = False

    def connection_lost(self, exc: Exception | None) -> None:
        self.ended.set()
        super().connection_lost(exc)

    def _untagged_response(self, line: bytes) -> Any:
        body = line[2:] if line.startswith(b"* ") else line
        if is_bye(body) and not self.logging_out:
            self.ended.set()  # aioimaplib would stay SELECTED and hang (testbed.md §1.5)
        if has_exists((body,)):
            self.exists_seen = True
        return super()._untagged_response(line)

    def _continuation(self, line: bytes) -> None:
        # Workaround for aioimaplib 2.0.3 (testbed.md §1.3): on a rejected token the
        # server sends a SASL error challenge ("+ eyJzdGF0dXMiOiI0MDEi…") and waits
        # for the client's empty response (RFC 4954 §4 / Google's XOAUTH2 document);
        # aioimaplib only appends the line to the pending command and never answers,
        # so ``xoauth2()`` hangs until its timeout. Answering with an empty line
        # makes the server send the tagged ``NO [AUTHENTICATIONFAILED]``.
        pending = self.pending_sync_command
        if pending is not None and pending.name == "AUTHENTICATE":
            self.transport.write(aioimaplib.CRLF)
            return
        super()._continuation(line)


class ImapSession:
    """One IMAP connection. Build it with ``await ImapSession.open(endpoint)``."""

    def __init__(self, protocol: _Protocol, endpoint: Endpoint) -> None:
        self._proto = protocol
        self._endpoint = endpoint
        self._woken = False

    # ------------------------------------------------------------ connect

    @classmethod
    async def open(cls, endpoint: Endpoint) -> ImapSession:
        """Connect, read the greeting, and upgrade with STARTTLS when configured.

        TLS certificates are verified against the system CAs plus ``ca_file``.

        Raises:
            ConnectionLost: refused, TLS failure, no greeting, STARTTLS refused.
        """
        loop = asyncio.get_running_loop()
        protocol = _Protocol(loop)
        context = endpoint.ssl_context or make_ssl_context(endpoint.ca_file)
        tls = context if endpoint.security is Security.TLS else None
        session = cls(protocol, endpoint)
        try:
            await asyncio.wait_for(
                loop.create_connection(lambda: protocol, endpoint.host, endpoint.port, ssl=tls),
                endpoint.timeout_seconds,
            )
            if tls is not None:
                _shrink_tls_buffer(protocol.transport)
            await session._race(protocol.wait("AUTH|NONAUTH"))
            _keepalive(protocol.transport)
            if endpoint.security is Security.STARTTLS:
                await session._starttls(context)
        except (OSError, TimeoutError, aioimaplib.AioImapException) as exc:
            session.abort()
            raise ConnectionLost(f"connect to {endpoint.host}:{endpoint.port}: {exc!r}") from None
        except ConnectionLost:
            session.abort()
            raise
        return session

    async def _starttls(self, context: ssl.SSLContext) -> None:
        """RFC 2595 / RFC 9051 §6.2.1: STARTTLS, handshake, then ask CAPABILITY again."""
        proto = self._proto
        reply = await self._race(
            proto.execute(aioimaplib.Command("STARTTLS", proto.new_tag(), loop=proto.loop))
        )
        if reply.result != "OK":
            raise ConnectionLost("STARTTLS refused")
        transport = await asyncio.wait_for(
            proto.loop.start_tls(
                proto.transport, proto, context, server_hostname=self._endpoint.host
            ),
            self._endpoint.timeout_seconds,
        )
        proto.transport = transport
        _shrink_tls_buffer(transport)
        await self._race(proto.capability())

    @property
    def tls_read_buffer_bytes(self) -> int | None:
        """Length of this connection's asyncio TLS read buffer (bytes); None if not TLS.

        ``TLS_READ_BUFFER_BYTES`` once ``_shrink_tls_buffer`` worked (observability
        and the memory test read it).
        """
        ssl_protocol = getattr(self._proto.transport, "_ssl_protocol", None)
        buffer = getattr(ssl_protocol, "_ssl_buffer", None)
        return len(buffer) if isinstance(buffer, bytearray) else None

    @property
    def capabilities(self) -> frozenset[str]:
        """Capabilities from the last CAPABILITY (upper-case atoms)."""
        return frozenset(str(c).upper() for c in self._proto.capabilities)

    @property
    def has_gmail_extensions(self) -> bool:
        """Whether the server offers X-GM-EXT-1 (X-GM-MSGID, X-GM-THRID)."""
        return GMAIL_EXTENSION in self.capabilities

    # ------------------------------------------------------------ authenticate

    async def authenticate_xoauth2(self, user: str, access_token: str) -> None:
        """AUTHENTICATE XOAUTH2 (Google's and Microsoft's XOAUTH2 SASL documents).

        Raises:
            LoginRejected: ``NO [AUTHENTICATIONFAILED]`` (an expired or revoked token).
            ConnectionLost: any other failure.
        """
        reply = await self._race(self._proto.xoauth2(user, access_token))
        await self._after_login(reply)

    async def login(self, user: str, password: str) -> None:
        """LOGIN (RFC 9051 §6.2.3) for generic IMAP servers.

        Raises:
            LoginRejected, ConnectionLost: as ``authenticate_xoauth2``.
        """
        reply = await self._race(self._proto.login(user, password))
        await self._after_login(reply)

    async def _after_login(self, reply: Any) -> None:
        if reply.result == "OK":
            # Servers may send new capabilities only after login (RFC 9051 §7.2.2).
            await self._race(self._proto.capability())
            return
        if reply.result == "NO" or is_auth_failure(reply.lines):
            raise LoginRejected("the server rejected the credentials")
        raise ConnectionLost(f"login answered {reply.result}")

    # ------------------------------------------------------------ folders

    async def list_folders(self) -> tuple[FolderInfo, ...]:
        """LIST "" "*" with RFC 6154 attributes (servers include them in plain LIST)."""
        reply = await self._race(self._proto.simple_command("LIST", '""', '"*"'))
        self._check(reply, "LIST")
        return parse_list(reply.lines)

    async def select(self, folder: str) -> SelectInfo:
        """SELECT a folder (RFC 9051 §6.3.2) and return UIDVALIDITY, UIDNEXT, EXISTS.

        Raises:
            ConnectionLost: SELECT failed (the folder may have gone: retry later).
        """
        reply = await self._race(self._proto.select(_quote(folder)))
        self._check(reply, "SELECT")
        self._proto.exists_seen = False
        return parse_select(reply.lines)

    async def uids_since(self, start_uid: int) -> tuple[Uid, ...]:
        """UID SEARCH UID start:* → the UIDs ≥ ``start_uid``, ascending.

        RFC 9051 §6.4.4: ``n:*`` with n above the largest UID still names the
        last message, so results below ``start_uid`` are dropped.
        """
        criteria = f"UID {max(start_uid, 1)}:*"
        reply = await self._race(self._proto.search(criteria, charset=None, by_uid=True))
        self._check(reply, "UID SEARCH")
        return tuple(u for u in parse_search(reply.lines) if u >= start_uid)

    async def uids_received_since(self, day: date) -> tuple[Uid, ...]:
        """UID SEARCH SINCE day (INTERNALDATE, server's day; RFC 9051 §6.4.4), ascending."""
        criteria = f"SINCE {day.day}-{day.strftime('%b')}-{day.year}"
        reply = await self._race(self._proto.search(criteria, charset=None, by_uid=True))
        self._check(reply, "UID SEARCH")
        return parse_search(reply.lines)

    async def fetch(self, uids: Sequence[int]) -> tuple[FetchedMessage, ...]:
        """UID FETCH ``BODY.PEEK[]`` (never sets \\Seen) and INTERNALDATE for ``uids``.

        Asks for X-GM-MSGID and X-GM-THRID when X-GM-EXT-1 is offered.
        Messages expunged meanwhile are simply absent from the result.

        Returns:
            Messages in ascending UID order.
        """
        if not uids:
            return ()
        items = "(UID INTERNALDATE BODY.PEEK[]"
        items += " X-GM-MSGID X-GM-THRID)" if self.has_gmail_extensions else ")"
        uid_set = ",".join(str(u) for u in uids)
        reply = await self._race(self._proto.fetch(uid_set, items, by_uid=True))
        self._check(reply, "UID FETCH")
        return parse_fetch(reply.lines)

    def take_exists(self) -> bool:
        """Return (and clear) whether an untagged EXISTS arrived since the last call."""
        seen, self._proto.exists_seen = self._proto.exists_seen, False
        return bool(seen)

    # ------------------------------------------------------------ waiting for mail

    async def idle(self, renew_seconds: float) -> bool:
        """IDLE (RFC 2177) until the server reports mail or ``renew_seconds`` pass; then DONE.

        Returns:
            True when an EXISTS arrived (fetch now), False on a plain renewal.

        Raises:
            ConnectionLost: BYE, EOF, no DONE acknowledgement within
                ``DONE_TIMEOUT_SECONDS`` (a silently dead socket), or IDLE
                refused. The whole call returns or raises within about
                ``renew_seconds``.
        """
        proto = self._proto
        while not proto.idle_queue.empty():
            proto.idle_queue.get_nowait()
        if self._woken:
            return False
        idle_task = asyncio.ensure_future(proto.idle())
        try:
            await self._race(_first(proto.wait_for_idle_response(), idle_task))
            if idle_task.done():
                raise ConnectionLost("IDLE refused")
            done_wait = min(DONE_TIMEOUT_SECONDS, renew_seconds / 4)
            got = await self._await_push(renew_seconds - done_wait)
            proto.idle_done()
            await self._race(asyncio.shield(idle_task), limit_seconds=done_wait)
        finally:
            if not idle_task.done():
                idle_task.cancel()
        return got or self.take_exists()

    async def _await_push(self, renew_seconds: float) -> bool:
        """Read IDLE pushes until EXISTS (True), a wake-up or the renewal time (False).

        Other pushes (``* OK Still here``, EXPUNGE, FETCH flags) keep waiting;
        an untagged NO or BAD raises ``ConnectionLost``.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + renew_seconds
        while (left := deadline - loop.time()) > 0:
            pushed = await self._race(self._proto.idle_queue.get(), limit_seconds=left, quiet=True)
            if pushed is None or WAKE in pushed:
                return False
            if any(bytes(line[:3]).upper() in (b"NO ", b"BAD") for line in pushed):
                # Dovecot says "* NO Internal error" when the selected folder is
                # deleted under the session: the selection is gone, start again.
                raise ConnectionLost("server error while idling")
            if has_exists(pushed):
                return True
        return False

    def wake(self) -> None:
        """End a running ``idle`` early (it still sends DONE); used to stop a watcher."""
        self._woken = True
        self._proto.idle_queue.put_nowait([WAKE])

    async def noop(self) -> bool:
        """NOOP (RFC 9051 §6.1.2), the poll when IDLE is absent; True when EXISTS arrived."""
        reply = await self._race(self._proto.simple_command("NOOP"))
        self._check(reply, "NOOP")
        return has_exists(reply.lines) or self.take_exists()

    async def logout(self) -> None:
        """LOGOUT politely (errors ignored: the socket is closed either way)."""
        self._proto.logging_out = True
        try:
            if not self._proto.ended.is_set():
                await self._race(self._proto.logout(), limit_seconds=5.0)
        except (ConnectionLost, aioimaplib.AioImapException):
            pass
        finally:
            self.abort()

    def abort(self) -> None:
        """Close the socket now (no LOGOUT)."""
        transport = self._proto.transport
        if transport is not None and not transport.is_closing():
            transport.abort()

    # ------------------------------------------------------------ plumbing

    async def _race(
        self, awaitable: Awaitable[T], *, limit_seconds: float | None = None, quiet: bool = False
    ) -> T:
        """Await ``awaitable`` unless the connection ends or ``limit_seconds`` pass first.

        ``quiet=True``: running out of time returns None instead of raising
        (IDLE renewal).

        Raises:
            ConnectionLost: the connection ended, the timeout passed (not quiet),
                or aioimaplib raised.
        """
        limit = self._endpoint.timeout_seconds if limit_seconds is None else limit_seconds
        task = asyncio.ensure_future(awaitable)
        ended = asyncio.ensure_future(self._proto.ended.wait())
        try:
            done, _ = await asyncio.wait(
                {task, ended}, timeout=limit, return_when="FIRST_COMPLETED"
            )
        finally:
            ended.cancel()
        if task in done:
            try:
                return task.result()
            except aioimaplib.AioImapException as exc:
                self.abort()
                raise ConnectionLost(f"protocol error: {exc!r}") from None
        task.cancel()
        if not done and quiet:
            return None  # type: ignore[return-value]
        self.abort()
        raise ConnectionLost("connection ended" if done else "server did not answer in time")

    def _check(self, reply: Any, command: str) -> None:
        if reply.result != "OK":
            raise ConnectionLost(f"{command} answered {reply.result}")


async def _first(*awaitables: Awaitable[Any]) -> None:
    """Return when one of ``awaitables`` completes; cancel the others unless futures."""
    tasks = [asyncio.ensure_future(a) for a in awaitables]
    _, pending = await asyncio.wait(tasks, return_when="FIRST_COMPLETED")
    for task, given in zip(tasks, awaitables, strict=True):
        if task in pending and not isinstance(given, asyncio.Future):
            task.cancel()


def _quote(folder: str) -> str:
    """Quote a folder name for SELECT (RFC 9051 §4.3: quoted string)."""
    return '"' + folder.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _keepalive(transport: Any) -> None:
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None:
        return
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in KEEPALIVE.items():
        if hasattr(socket, name):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)


__all__ = [
    "ConnectionLost",
    "Endpoint",
    "FetchedMessage",
    "FolderInfo",
    "ImapSession",
    "Line",
    "LoginRejected",
    "SelectInfo",
    "tls_buffer_shrink_supported",
]

"""A provider-like submission server (aiosmtpd) in front of the test Dovecot.

Mimics smtp.gmail.com / smtp.office365.com for what the gateway uses:
port-587 style STARTTLS (required before AUTH, RFC 3207) and implicit TLS
(RFC 8314), AUTH XOAUTH2 (Google's "OAuth 2.0 Mechanism" document:
SASL-IR or challenge form, Gmail-style JSON error challenge then ``535 5.7.8``),
validating the testbed's JWTs, and AUTH PLAIN/LOGIN (RFC 4616, the LOGIN
draft; aiosmtpd's own mechanisms, only after TLS) against the Dovecot
user's passwd-file entry, as a generic IMAP/SMTP host (or Dovecot's
submission service) checks a password. Each accepted message is delivered by LMTP to
recipients that are Dovecot users (others are recorded, not delivered, like
mail relayed to the Internet) and a copy is filed in the sender's Sent folder
(``[Gmail]/Sent Mail`` or ``Sent Items``, by the sender's layout).
``rewrite_message_id=True`` replaces the Message-ID like Exchange Online and
names it in the 250 reply. Runs in aiosmtpd's threaded Controller (a test
convenience, STYLE.md §8). Must not listen beyond loopback.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import dataclasses
import hmac
import itertools
import json
import re
import ssl
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import MISSING, SMTP, AuthResult, Envelope, LoginPassword, Session

from tests.testbed.dovecot import Dovecot
from tests.testbed.netutil import LOOPBACK, free_ports
from tests.testbed.tokens import InvalidTokenError, TokenKeys

#: Line limit for commands: an ``AUTH XOAUTH2 <base64>`` line with a JWT is ~1 KB
#: (RFC 4954 §4 allows long AUTH lines; aiosmtpd's default is 512, testbed.md §5).
COMMAND_SIZE_LIMIT = 8192
SENT_FOLDERS = {"gmail": "[Gmail]/Sent Mail", "outlook": "Sent Items"}
REPLY_AUTH_FAILED = "535 5.7.8 Username and Password not accepted."
REPLY_AUTH_REQUIRED = "530 5.7.0 Authentication Required"
REPLY_QUEUED = "250 2.0.0 OK queued"
REPLY_TRANSIENT = {
    421: "421 4.7.0 Try again later, closing connection.",
    451: "451 4.3.0 Temporary server error. Please try again later.",
}
LOST_REPLY_HOLD_SECONDS = 600.0
"""How long a held DATA reply waits (the client times out and drops the connection first)."""
GMAIL_ERROR_CHALLENGE = {"status": "400", "schemes": "Bearer", "scope": "https://mail.google.com/"}
_MESSAGE_ID = re.compile(rb"^Message-ID:[^\r\n]*\r?\n(?:[ \t][^\r\n]*\r?\n)*", re.I | re.M)


@dataclass(frozen=True, slots=True, kw_only=True)
class Transaction:
    """One accepted message, for assertions.

    Attributes:
        auth_user: the XOAUTH2 ``user=`` or PLAIN/LOGIN login that authenticated.
        envelope_sender: MAIL FROM (RFC 5321 §3.3).
        envelope_recipients: RCPT TO, in order.
        delivered_to: the recipients that are Dovecot users (got it by LMTP).
        content: the bytes as delivered (Message-ID rewritten if asked).
        message_id: the Message-ID named in the reply when rewritten, else None.
        sent_folder: where the sender's copy went, or None (sender has no layout).
        auth_mechanism: ``XOAUTH2``, ``PLAIN`` or ``LOGIN``.
        reply_lost: the reply to the end of the data was held back (``lose_next_replies``).
    """

    auth_user: str
    envelope_sender: str
    envelope_recipients: tuple[str, ...]
    delivered_to: tuple[str, ...]
    content: bytes
    message_id: str | None
    sent_folder: str | None
    auth_mechanism: str = "XOAUTH2"
    reply_lost: bool = False


@dataclass(frozen=True, slots=True)
class _PasswordUser:
    """``session.auth_data`` after PLAIN/LOGIN: the login and the mechanism."""

    user: str
    mechanism: str


class _SubmissionSMTP(SMTP):
    command_size_limit = COMMAND_SIZE_LIMIT
    command_size_limits: ClassVar[dict[str, int]] = collections.defaultdict(  # type: ignore[misc]
        lambda: COMMAND_SIZE_LIMIT
    )
    line_length_limit = COMMAND_SIZE_LIMIT


class _Controller(Controller):
    def factory(self) -> SMTP:
        return _SubmissionSMTP(self.handler, **self.SMTP_kwargs)


class SubmissionServer:
    """Lifecycle, options and records of the submission stand-in."""

    hostname = "smtp.testbed.test"

    def __init__(
        self, keys: TokenKeys, dovecot: Dovecot, *, cert_file: Path, key_file: Path
    ) -> None:
        """Build (not start); TLS uses ``cert_file``/``key_file`` (e.g. Dovecot's)."""
        self.keys = keys
        self.dovecot = dovecot
        self.rewrite_message_id = False
        self.transactions: list[Transaction] = []
        self._tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._tls.load_cert_chain(str(cert_file), str(key_file))
        self._lock = threading.Lock()
        self._failures: list[int] = []
        self._lost_replies = 0
        self._internal_ids = itertools.count(1)
        self._controllers: list[Controller] = []
        self.port = 0
        self.tls_port = 0

    def start(self) -> None:
        """Listen on free loopback ports: ``port`` (STARTTLS) and ``tls_port`` (implicit TLS)."""
        for _attempt in range(5):
            self.port, self.tls_port = free_ports(2)
            starttls = _Controller(
                self,
                hostname=LOOPBACK,
                port=self.port,
                server_hostname=self.hostname,
                tls_context=self._tls,
                require_starttls=True,
                authenticator=self._check_password,
            )
            implicit = _Controller(
                self,
                hostname=LOOPBACK,
                port=self.tls_port,
                server_hostname=self.hostname,
                ssl_context=self._tls,
                authenticator=self._check_password,
            )
            try:
                for controller in (starttls, implicit):
                    controller.start()
                    self._controllers.append(controller)
                return
            except OSError:
                self.stop()
        raise RuntimeError("submission server: no free ports")

    def stop(self) -> None:
        """Stop both listeners; idempotent."""
        while self._controllers:
            self._controllers.pop().stop()

    def fail_next(self, count: int, code: int = 421) -> None:
        """Answer the next ``count`` MAIL FROM with ``code`` (421 also closes the session).

        ``count = 0`` clears pending failures.
        """
        if code not in REPLY_TRANSIENT:
            raise ValueError(f"code must be one of {sorted(REPLY_TRANSIENT)}")
        with self._lock:
            if count == 0:
                self._failures.clear()
            self._failures.extend([code] * count)

    def lose_next_replies(self, count: int) -> None:
        """Accept and deliver the next ``count`` messages but never answer their end of data.

        The reply is held (up to ``LOST_REPLY_HOLD_SECONDS``) until the
        client gives up and drops the connection: a 250 lost on the way,
        the case a client cannot tell from a refusal. ``count = 0`` clears.
        """
        with self._lock:
            self._lost_replies = count

    # -------------------------------------------------------------- hooks

    def _check_password(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        mechanism: str,
        auth_data: object,
    ) -> AuthResult:
        """aiosmtpd authenticator for PLAIN and LOGIN: the Dovecot user's password.

        A wrong or unknown login gets ``535 5.7.8`` like XOAUTH2. aiosmtpd
        refuses both mechanisms before TLS (``auth_require_tls``).
        """
        if not isinstance(auth_data, LoginPassword):
            return AuthResult(success=False, handled=False, message=REPLY_AUTH_FAILED)
        user = auth_data.login.decode(errors="replace").lower()
        expected = self._password_of(user)
        if expected is not None and hmac.compare_digest(expected, auth_data.password):
            return AuthResult(success=True, auth_data=_PasswordUser(user, mechanism))
        return AuthResult(success=False, handled=False, message=REPLY_AUTH_FAILED)

    async def auth_XOAUTH2(self, server: SMTP, args: list[str]) -> AuthResult:
        """AUTH XOAUTH2 (Google's XOAUTH2 document; RFC 4954 §4 framing)."""
        if len(args) == 2:
            try:
                blob = base64.b64decode(args[1], validate=True)
            except binascii.Error:
                return AuthResult(success=False, handled=False, message="501 5.5.2 Bad base64")
        else:
            answer = await server.challenge_auth("", encode_to_b64=False)
            if answer is MISSING:
                return AuthResult(success=False, handled=True)
            blob = answer
        user = self._check_xoauth2(blob)
        if user is not None:
            return AuthResult(success=True, auth_data=user)
        await server.challenge_auth(json.dumps(GMAIL_ERROR_CHALLENGE))
        return AuthResult(success=False, handled=False, message=REPLY_AUTH_FAILED)

    async def handle_MAIL(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        if not session.authenticated:
            return REPLY_AUTH_REQUIRED
        with self._lock:
            failure = self._failures.pop(0) if self._failures else None
        if failure is not None:
            if failure == 421:
                transport = server.transport
                if transport is not None:
                    asyncio.get_running_loop().call_soon(transport.close)
            return REPLY_TRANSIENT[failure]
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 OK"

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        if not session.authenticated:
            return REPLY_AUTH_REQUIRED
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
    ) -> str:
        content = bytes(envelope.original_content or b"")
        message_id = None
        if self.rewrite_message_id:
            message_id = f"{uuid.uuid4().hex.upper()}@{self.hostname}"
            content = _replace_message_id(content, message_id)
        auth = session.auth_data
        sender, mechanism = (
            (auth.user, auth.mechanism)
            if isinstance(auth, _PasswordUser)
            else (str(auth), "XOAUTH2")
        )
        with self._lock:
            lose = self._lost_replies > 0
            self._lost_replies -= lose
        transaction = await asyncio.to_thread(
            self._deliver,
            sender,
            str(envelope.mail_from),
            tuple(envelope.rcpt_tos),
            content,
            message_id,
        )
        transaction = dataclasses.replace(transaction, auth_mechanism=mechanism, reply_lost=lose)
        with self._lock:
            self.transactions.append(transaction)
        if lose:  # cancelled by aiosmtpd when the client drops the connection
            await asyncio.sleep(LOST_REPLY_HOLD_SECONDS)
        if message_id is None:
            return REPLY_QUEUED
        return (
            f"250 2.6.0 <{message_id}> [InternalId={next(self._internal_ids)}] "
            "Queued mail for delivery"
        )

    # ------------------------------------------------------------ helpers

    def _password_of(self, user: str) -> bytes | None:
        """The PLAIN password of ``user`` in Dovecot's passwd-file, or None.

        Reads ``passwd.d/<user>`` as ``Dovecot.add_user`` writes it:
        ``user:{PLAIN}secret::::::``.
        """
        if "/" in user or not user:
            return None
        try:
            line = (self.dovecot.root / "passwd.d" / user).read_text().splitlines()[0]
        except (OSError, IndexError):
            return None
        name, _, rest = line.partition(":")
        secret = rest.split(":", 1)[0]
        if name != user or not secret.startswith("{PLAIN}"):
            return None
        return secret.removeprefix("{PLAIN}").encode()

    def _check_xoauth2(self, blob: bytes) -> str | None:
        fields = dict(
            p.split("=", 1) for p in blob.decode(errors="replace").split("\x01") if "=" in p
        )
        auth = fields.get("auth", "")
        if not auth.lower().startswith("bearer "):
            return None
        try:
            claims = self.keys.verify(auth[7:].strip())
        except InvalidTokenError:
            return None
        user = fields.get("user", "").lower()
        return user if claims["sub"] == user else None

    def _deliver(
        self,
        sender: str,
        envelope_sender: str,
        recipients: tuple[str, ...],
        content: bytes,
        message_id: str | None,
    ) -> Transaction:
        local = self.dovecot.users()
        delivered = tuple(r for r in recipients if r.lower() in local)
        for recipient in delivered:
            self.dovecot.deliver_lmtp(recipient.lower(), content, sender=envelope_sender)
        layout = self.dovecot.layout_of(sender)
        sent_folder = SENT_FOLDERS.get(layout or "")
        if sent_folder is not None:
            self.dovecot.append(sender, sent_folder, content, flags=("\\Seen",))
        return Transaction(
            auth_user=sender,
            envelope_sender=envelope_sender,
            envelope_recipients=recipients,
            delivered_to=delivered,
            content=content,
            message_id=message_id,
            sent_folder=sent_folder,
        )


def _replace_message_id(content: bytes, message_id: str) -> bytes:
    """Replace (or add) the Message-ID header field in the header section (RFC 5322 §3.6.4)."""
    head, sep, body = content.partition(b"\r\n\r\n")
    if not sep:
        head, sep, body = content.partition(b"\n\n")
    field = f"Message-ID: <{message_id}>\r\n".encode()
    head_nl = head + b"\r\n"
    if _MESSAGE_ID.search(head_nl):
        head_nl = _MESSAGE_ID.sub(lambda _m: field, head_nl, count=1)
    else:
        head_nl = field + head_nl
    return head_nl[:-2] + sep + body

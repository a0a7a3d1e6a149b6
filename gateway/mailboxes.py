"""The mailbox service: connect, authorize, refresh, update, re-auth, disconnect (R19-R22).

Edge module: orchestrates ``gateway.oauth`` (HTTP to providers), an IMAP
LOGIN check for generic servers, ``gateway.secrets`` (encryption) and the
``storage.repos.mailboxes`` / ``oauth_states`` repositories. It never
logs a token, password, code or state value.

States (``MailboxState``)::

    (none) --connect--> connected --invalid_grant--> reauth_required
                          |   ^                            |
                 disconnect|   +--------reconnect----------+
                          v   |
                     disconnected

Every transition commits its sync-log row and ``mailbox.state_changed``
webhook rows in the same transaction, then calls the listeners (e.g. the
IMAP supervisor stops sessions).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from imapclient import IMAPClient
from imapclient.exceptions import LoginError

from gateway import oauth
from gateway.config import Security, Settings
from gateway.errors import AuthError, PermanentError, TransientError
from gateway.secrets import TokenCipher
from ingest.types import MailboxId, MailboxState, Provider
from storage.db import Database
from storage.repos import mailboxes as repo
from storage.repos import oauth_states
from storage.repos.directory import resolve_subaccount
from storage.repos.mailboxes import MailboxRecord, NewCredentials, StateChange

log = logging.getLogger(__name__)

STATE_TTL_SECONDS = 600
"""How long an authorization may take from URL to callback."""
ACCESS_TOKEN_MIN_VALIDITY_SECONDS = 60
"""``access_token`` refreshes a token that expires sooner than this."""
STATE_BYTES = 32
CALLBACK_PATH = "/oauth/callback"
OAUTH_PROVIDERS = (Provider.GMAIL, Provider.OUTLOOK)

PURPOSE_CONNECT = "connect"
PURPOSE_UPDATE = "update"

# MailboxError codes (stable names for the HTTP error body and the CLI).
ACCESS_DENIED = "access_denied"
PROVIDER_ERROR = "provider_error"
PROVIDER_UNAVAILABLE = "provider_unavailable"
IDENTITY_NOT_VERIFIED = "identity_not_verified"
LOGIN_FAILED = "login_failed"
NOT_CONNECTED = "not_connected"
REAUTH_REQUIRED = "reauth_required"
WRONG_KIND = "wrong_kind"
BAD_REQUEST = "bad_request"

StateListener = Callable[[StateChange], Awaitable[None]]


class MailboxError(Exception):
    """A connect/refresh/disconnect step failed; ``code`` is a stable name, the text is for users.

    Codes: ``access_denied``, ``provider_error``, ``provider_unavailable``
    (transient), ``identity_not_verified``, ``login_failed``,
    ``not_connected``, ``reauth_required``, ``wrong_kind``, ``bad_request``
    and the state codes of ``storage.repos.oauth_states``
    (``state_unknown``, ``state_used``, ``state_expired``).
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True, slots=True, kw_only=True)
class AuthorizationRequest:
    """Where to send the user: ``url`` is the consent page; ``state`` expires at ``expires_at``."""

    url: str
    state: str
    expires_at: datetime
    provider: Provider
    purpose: str


def _utcnow() -> datetime:
    return datetime.now(UTC)


def state_digest(state: str) -> str:
    """Return the hex SHA-256 under which a ``state`` value is stored."""
    return hashlib.sha256(state.encode("utf-8")).hexdigest()


class MailboxService:
    """Owns every mailbox state change. One instance per process (it holds refresh locks).

    Args:
        db: the database.
        settings: the whole config (``security``, ``providers``, ``http.public_url``, ``webhooks``).
        clock: returns aware UTC now (injected in tests).
        retry: backoff for transient provider errors.
        sleep: the backoff's sleep (injected in tests).

    The token cipher is built on first use, so a gateway without
    ``security.token_key`` still starts (connecting then fails clearly).
    """

    def __init__(
        self,
        db: Database,
        settings: Settings,
        *,
        clock: Callable[[], datetime] = _utcnow,
        retry: oauth.RetryPolicy | None = None,
        sleep: Callable[[float], Awaitable[None]] | None = None,
    ) -> None:
        self._db = db
        self._settings = settings
        self._clock = clock
        self._retry = retry or oauth.RetryPolicy(
            max_seconds=float(settings.sync.reconnect_backoff_max_seconds)
        )
        self._sleep = sleep
        self._cipher: TokenCipher | None = None
        self._listeners: list[StateListener] = []
        self._locks: dict[int, asyncio.Lock] = {}
        self.redirect_uri = settings.http.public_url.rstrip("/") + CALLBACK_PATH
        self.webhook_urls = tuple(
            hook.url for hook in settings.webhooks if repo.STATE_CHANGED_EVENT in hook.events
        )

    # ------------------------------------------------------------ plumbing

    @property
    def cipher(self) -> TokenCipher:
        """The token cipher (raises ``gateway.secrets.MissingTokenKey`` when unset)."""
        if self._cipher is None:
            self._cipher = TokenCipher.from_settings(self._settings.security)
        return self._cipher

    def add_listener(self, listener: StateListener) -> None:
        """Call ``listener(change)`` after every committed state change (in order, awaited)."""
        self._listeners.append(listener)

    async def _notify(self, changes: tuple[StateChange, ...]) -> None:
        for change in changes:
            level = logging.ERROR if change.state == MailboxState.REAUTH_REQUIRED else logging.INFO
            log.log(
                level,
                "mailbox state changed",
                extra={
                    "mailbox_id": change.mailbox_id,
                    "rule": change.rule,
                    "reason": change.state,
                },
            )
            for listener in self._listeners:
                try:
                    await listener(change)
                except Exception:
                    log.exception(
                        "mailbox listener failed", extra={"mailbox_id": change.mailbox_id}
                    )

    def profile(self, provider: Provider) -> oauth.ProviderProfile:
        """Return the OAuth profile of ``gmail`` or ``outlook`` from the config.

        Raises:
            MailboxError: ``bad_request`` for ``imap``; ``provider_error`` when not configured.
        """
        if provider not in OAUTH_PROVIDERS:
            raise MailboxError(BAD_REQUEST, f"{provider.value} does not use OAuth")
        section = getattr(self._settings.providers, provider.value)
        try:
            return oauth.ProviderProfile.from_settings(provider, section)
        except PermanentError as exc:
            raise MailboxError(PROVIDER_ERROR, str(exc)) from None

    async def _resolve(self, user: str | int, subaccount: str | int) -> tuple[int, int]:
        def find(session: Any) -> tuple[int, int]:
            sub_id = resolve_subaccount(session, str(subaccount))
            return repo.member_user_id(session, user, sub_id), sub_id

        return await self._db.read(find)

    # ------------------------------------------------------------ reading

    async def get(self, mailbox_id: int) -> MailboxRecord:
        """Return one mailbox (raises ``storage.errors.NotFound``)."""
        return await self._db.read(repo.get_mailbox, mailbox_id)

    async def list(
        self, *, user_id: int | None = None, subaccount_id: int | None = None
    ) -> tuple[MailboxRecord, ...]:
        """Return mailboxes, by id, optionally of one user and/or sub-account."""
        return await self._db.read(
            repo.list_mailboxes, user_id=user_id, subaccount_id=subaccount_id
        )

    async def current(self, user: str | int, subaccount: str | int) -> MailboxRecord | None:
        """Return the user's mailbox in the sub-account that is not disconnected, or None."""
        user_id, sub_id = await self._resolve(user, subaccount)
        return await self._db.read(repo.active_mailbox, user_id, sub_id)

    # ------------------------------------------------------------ OAuth connect / update

    async def start_authorization(
        self,
        user: str | int,
        subaccount: str | int,
        provider: Provider,
        *,
        purpose: str = PURPOSE_CONNECT,
    ) -> AuthorizationRequest:
        """Store a single-use ``state`` bound to the user and sub-account; return the consent URL.

        Follows RFC 6749 §4.1.1 and §10.12 (state), RFC 7636 (PKCE S256).
        With ``purpose="update"`` (R20) the user's current mailbox stays
        active until the new authorization succeeds.

        Raises:
            storage.errors.NotFound: unknown user, sub-account, or not a member.
            MailboxError: ``bad_request`` (imap, unknown purpose),
                ``provider_error`` (provider not configured).
            gateway.secrets.MissingTokenKey: ``security.token_key`` unset.
        """
        if purpose not in (PURPOSE_CONNECT, PURPOSE_UPDATE):
            raise MailboxError(BAD_REQUEST, f"unknown purpose {purpose!r}")
        profile = self.profile(provider)
        user_id, sub_id = await self._resolve(user, subaccount)
        current = await self._db.read(repo.active_mailbox, user_id, sub_id)
        state, verifier, nonce = (secrets.token_urlsafe(STATE_BYTES) for _ in range(3))
        now = self._clock()
        expires_at = now + timedelta(seconds=STATE_TTL_SECONDS)
        pending = oauth_states.PendingAuthorization(
            user_id=user_id,  # type: ignore[arg-type]
            subaccount_id=sub_id,  # type: ignore[arg-type]
            provider=provider,
            purpose=purpose,
            code_verifier_ciphertext=self.cipher.encrypt(verifier.encode("ascii")),
            nonce=nonce,
            redirect_uri=self.redirect_uri,
            replaces_mailbox_id=current.id if current is not None else None,
        )
        await self._db.run(
            oauth_states.add_oauth_state,
            state_sha256=state_digest(state),
            pending=pending,
            created_at=now,
            expires_at=expires_at,
        )
        url = oauth.authorization_url(
            profile,
            redirect_uri=self.redirect_uri,
            state=state,
            code_verifier=verifier,
            nonce=nonce,
            login_hint=current.address if current is not None else None,
        )
        return AuthorizationRequest(
            url=url, state=state, expires_at=expires_at, provider=provider, purpose=purpose
        )

    async def finish_authorization(
        self, state: str, code: str | None = None, error: str | None = None
    ) -> MailboxRecord:
        """Finish an authorization from the callback (RFC 6749 §4.1.2): mailbox connected.

        The state is claimed (single use) before anything else, also when
        the provider reports an error. On success the mailbox of the
        provider-vouched address is connected (same row when reconnecting,
        R22) and any other active mailbox of the user in the sub-account is
        disconnected in the same transaction (R20).

        Raises:
            storage.repos.oauth_states.StateRejected: ``state_unknown``,
                ``state_used``, ``state_expired``.
            MailboxError: ``access_denied`` / ``provider_error`` (the provider's error, a
                failed exchange or bad token answer), ``provider_unavailable`` (transient),
                ``identity_not_verified``, ``bad_request`` (no code).
        """
        now = self._clock()
        pending = await self._db.run(oauth_states.claim_oauth_state, state_digest(state), now)
        if error is not None:
            code_name = ACCESS_DENIED if error == ACCESS_DENIED else PROVIDER_ERROR
            raise MailboxError(code_name, f"the provider answered {error!r}; nothing was changed")
        if not code:
            raise MailboxError(BAD_REQUEST, "callback without code or error")
        profile = self.profile(pending.provider)
        verifier = self.cipher.decrypt(pending.code_verifier_ciphertext).decode("ascii")
        try:
            tokens = await oauth.exchange_code(
                profile,
                code=code,
                redirect_uri=pending.redirect_uri,
                code_verifier=verifier,
                now=now,
                policy=self._retry,
            )
            identity = await oauth.verified_identity(profile, tokens, nonce=pending.nonce, now=now)
        except TransientError as exc:
            raise MailboxError(PROVIDER_UNAVAILABLE, f"provider unavailable: {exc}") from None
        except (AuthError, PermanentError) as exc:
            raise MailboxError(PROVIDER_ERROR, f"authorization failed: {exc}") from None
        if tokens.refresh_token is None:
            raise MailboxError(PROVIDER_ERROR, "provider issued no refresh token (offline access)")
        new = NewCredentials(
            user_id=pending.user_id,
            subaccount_id=pending.subaccount_id,
            provider=pending.provider,
            address=identity.address,
            credentials_ciphertext=self._oauth_ciphertext(tokens),
            token_expires_at=tokens.expires_at,
        )
        return await self._save(new, now)

    async def _save(self, new: NewCredentials, now: datetime) -> MailboxRecord:
        record, changes = await self._db.run(
            repo.save_connected, new, now=now, webhook_urls=self.webhook_urls
        )
        await self._notify(changes)
        return record

    def _oauth_ciphertext(self, tokens: oauth.TokenSet) -> bytes:
        return self.cipher.encrypt_json(
            {
                "kind": "oauth",
                "access_token": tokens.access_token,
                "refresh_token": tokens.refresh_token,
                "expires_at": tokens.expires_at.isoformat() if tokens.expires_at else None,
            }
        )

    # ------------------------------------------------------------ generic IMAP

    async def connect_imap(
        self, user: str | int, subaccount: str | int, server: ImapServer, password: str
    ) -> MailboxRecord:
        """Connect a generic IMAP/SMTP mailbox after a real IMAP LOGIN (RFC 9051 §6.2.3) succeeds.

        The address is ``server.username`` when it is an addr-spec (what
        the server accepted), else ``server.address``. Nothing is saved
        when the login fails. Replaces any other active mailbox (R20).

        Raises:
            MailboxError: ``login_failed`` (refused or unreachable), ``bad_request``.
            storage.errors.NotFound: unknown user or sub-account.
        """
        address = server.address or server.username
        if "@" not in address:
            raise MailboxError(BAD_REQUEST, "give the mailbox address (username is not one)")
        user_id, sub_id = await self._resolve(user, subaccount)
        ca_file = self._settings.providers.imap.ca_file
        await asyncio.to_thread(check_login, server, password, str(ca_file) if ca_file else None)
        new = NewCredentials(
            user_id=user_id,  # type: ignore[arg-type]
            subaccount_id=sub_id,  # type: ignore[arg-type]
            provider=Provider.IMAP,
            address=address,
            credentials_ciphertext=self.cipher.encrypt_json(
                {"kind": "password", "username": server.username, "password": password}
            ),
            token_expires_at=None,
            server_settings=server.settings(),
        )
        return await self._save(new, self._clock())

    async def password_credentials(self, mailbox_id: int) -> tuple[str, str]:
        """Return ``(username, password)`` of a connected generic IMAP mailbox.

        Raises:
            MailboxError: ``not_connected``, ``wrong_kind`` (an OAuth mailbox).
        """
        creds = await self._credentials(mailbox_id)
        if creds.get("kind") != "password":
            raise MailboxError(WRONG_KIND, f"mailbox {mailbox_id} uses OAuth")
        return str(creds["username"]), str(creds["password"])

    async def _credentials(self, mailbox_id: int) -> dict[str, Any]:
        record, ciphertext = await self._db.read(repo.load_credentials, mailbox_id)
        if record.state == MailboxState.REAUTH_REQUIRED:
            raise MailboxError(REAUTH_REQUIRED, f"mailbox {mailbox_id} needs re-authorization")
        if record.state != MailboxState.CONNECTED or ciphertext is None:
            raise MailboxError(NOT_CONNECTED, f"mailbox {mailbox_id} is not connected")
        return self.cipher.decrypt_json(ciphertext)

    # ------------------------------------------------------------ token life (R22)

    async def access_token(self, mailbox_id: int, *, force_refresh: bool = False) -> str:
        """Return a valid access token for an IMAP/SMTP XOAUTH2 login, refreshing when needed.

        Call it for every new connection; pass ``force_refresh=True`` after
        the server answered AUTHENTICATIONFAILED (an expired token). One
        refresh per mailbox runs at a time (Microsoft rotates refresh tokens).

        Raises:
            MailboxError: ``reauth_required`` (the provider said invalid_grant: the
                mailbox moved to ``reauth_required``, R22), ``not_connected``,
                ``wrong_kind``, ``provider_error`` (permanent, state unchanged),
                ``provider_unavailable`` (transient after retries, state unchanged).
        """
        lock = self._locks.setdefault(mailbox_id, asyncio.Lock())
        async with lock:
            creds = await self._credentials(mailbox_id)
            if creds.get("kind") != "oauth":
                raise MailboxError(WRONG_KIND, f"mailbox {mailbox_id} uses a password")
            expires_raw = creds.get("expires_at")
            expires_at = datetime.fromisoformat(expires_raw) if expires_raw else None
            margin = timedelta(seconds=ACCESS_TOKEN_MIN_VALIDITY_SECONDS)
            if not force_refresh and (expires_at is None or expires_at - self._clock() > margin):
                return str(creds["access_token"])
            return await self._refresh_locked(mailbox_id, creds)

    async def refresh(self, mailbox_id: int) -> str:
        """Refresh now (the scheduler's call); same errors as ``access_token``."""
        return await self.access_token(mailbox_id, force_refresh=True)

    async def _refresh_locked(self, mailbox_id: int, creds: dict[str, Any]) -> str:
        record = await self.get(mailbox_id)
        profile = self.profile(record.provider)
        now = self._clock()
        try:
            tokens = await oauth.refresh_access_token(
                profile,
                str(creds["refresh_token"]),
                now=now,
                policy=self._retry,
                sleep=self._sleep,
            )
        except AuthError as exc:
            await self.mark_reauth_required(mailbox_id, f"refresh token rejected ({exc})")
            raise MailboxError(
                REAUTH_REQUIRED, f"mailbox {mailbox_id} needs re-authorization"
            ) from None
        except TransientError as exc:
            raise MailboxError(PROVIDER_UNAVAILABLE, f"token refresh failed: {exc}") from None
        except PermanentError as exc:
            log.error("token refresh refused", extra={"mailbox_id": mailbox_id, "reason": str(exc)})
            raise MailboxError(PROVIDER_ERROR, f"token refresh failed: {exc}") from None
        stored = await self._db.run(
            repo.store_tokens, mailbox_id, self._oauth_ciphertext(tokens), tokens.expires_at
        )
        if not stored:
            raise MailboxError(NOT_CONNECTED, f"mailbox {mailbox_id} was disconnected")
        return tokens.access_token

    async def mark_reauth_required(self, mailbox_id: int, reason: str) -> None:
        """Move a connected mailbox to ``reauth_required`` (R22): log, event, listeners."""
        change = await self._db.run(
            repo.mark_reauth_required,
            mailbox_id,
            reason=reason,
            now=self._clock(),
            webhook_urls=self.webhook_urls,
        )
        if change is not None:
            await self._notify((change,))

    async def refresh_due(self, now: datetime) -> tuple[MailboxId, ...]:
        """Return connected OAuth mailboxes whose token expires within ``refresh_ahead_seconds``."""
        ahead = max(
            self._settings.providers.gmail.refresh_ahead_seconds,
            self._settings.providers.outlook.refresh_ahead_seconds,
        )
        return await self._db.read(repo.due_for_refresh, now + timedelta(seconds=ahead))

    # ------------------------------------------------------------ disconnect (R21)

    async def disconnect(self, mailbox_id: int) -> MailboxRecord:
        """Disconnect (R21): tokens deleted, then revoked at the provider if it can; messages kept.

        Idempotent: a disconnected mailbox is returned unchanged.

        Raises:
            storage.errors.NotFound: no mailbox has that id.
        """
        record, change, old = await self._db.run(
            repo.disconnect_mailbox, mailbox_id, now=self._clock(), webhook_urls=self.webhook_urls
        )
        if change is not None:
            await self._notify((change,))
        if old is not None and record.provider in OAUTH_PROVIDERS:
            creds = self.cipher.decrypt_json(old)
            token = creds.get("refresh_token") or creds.get("access_token")
            hint = "refresh_token" if creds.get("refresh_token") else "access_token"
            if token:
                await oauth.revoke_token(self.profile(record.provider), str(token), hint)
        return record


@dataclass(frozen=True, slots=True, kw_only=True)
class ImapServer:
    """A generic IMAP/SMTP account's servers (RFC 9051, RFC 6409); no password here.

    Attributes:
        address: the mailbox's addr-spec, or "" to use ``username``.
        security: ``tls`` (implicit, RFC 8314), ``starttls`` (RFC 2595) or ``plain``.
    """

    imap_host: str
    imap_port: int
    imap_security: Security
    smtp_host: str
    smtp_port: int
    smtp_security: Security
    username: str
    address: str = ""

    def settings(self) -> dict[str, Any]:
        """Return the JSON stored in ``mailboxes.server_settings``."""
        return {
            "imap_host": self.imap_host,
            "imap_port": self.imap_port,
            "imap_security": self.imap_security.value,
            "smtp_host": self.smtp_host,
            "smtp_port": self.smtp_port,
            "smtp_security": self.smtp_security.value,
            "username": self.username,
        }


IMAP_TIMEOUT_SECONDS = 20.0


def check_login(server: ImapServer, password: str, ca_file: str | None) -> None:
    """Log in to the IMAP server and out again (blocking: run it in a thread).

    TLS certificates are always verified (system CAs, plus ``ca_file``).

    Raises:
        MailboxError: ``login_failed`` when the server refuses the login or cannot be reached.
    """
    context = ssl.create_default_context(cafile=ca_file)
    try:
        client = IMAPClient(
            server.imap_host,
            port=server.imap_port,
            ssl=server.imap_security == Security.TLS,
            ssl_context=context,
            timeout=IMAP_TIMEOUT_SECONDS,
        )
        try:
            if server.imap_security == Security.STARTTLS:
                client.starttls(context)
            client.login(server.username, password)
        finally:
            try:
                client.logout()
            except Exception:  # noqa: S110 (the login result is what matters)
                pass
    except LoginError:
        raise MailboxError(
            LOGIN_FAILED, "the IMAP server refused the username or password; nothing was saved"
        ) from None
    except (OSError, ssl.SSLError) as exc:
        raise MailboxError(
            LOGIN_FAILED, f"cannot reach {server.imap_host}:{server.imap_port}: {exc}"
        ) from None

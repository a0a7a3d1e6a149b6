"""OAuth2 client for Gmail and Outlook: authorize, exchange, refresh, revoke, identify (R19, R22).

Edge module: talks HTTP to the providers' endpoints (authlib's
``AsyncOAuth2Client`` over httpx) and nothing else; no database, no
secrets in logs. Follows RFC 6749 (authorization code grant §4.1,
refresh §6), RFC 7636 (PKCE, S256 only), RFC 7009 (revocation) and
OpenID Connect Core 1.0 (ID token validation §3.1.3.7, UserInfo §5.3).
Every provider error is turned into ``TransientError`` (5xx, 429,
timeouts, connection errors: retried here with capped jittered backoff),
``AuthError`` (``invalid_grant``: the grant is gone, R22) or
``PermanentError`` (anything else: wrong client secret, HTML answers) by
``classify``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import secrets
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, TypeVar

import httpx2 as httpx
from authlib.integrations.base_client.errors import OAuthError
from authlib.integrations.httpx_client import AsyncOAuth2Client
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet, OctKey
from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    stop_after_attempt,
    wait_random_exponential,
)

from gateway.config import ProviderSettings
from gateway.errors import AuthError, PermanentError, TransientError
from ingest.types import Provider

log = logging.getLogger(__name__)
T = TypeVar("T")

HTTP_TIMEOUT_SECONDS = 20.0
ID_TOKEN_LEEWAY_SECONDS = 120
"""Clock skew allowed on ``exp``/``iat`` of ID tokens (OIDC Core §3.1.3.7 item 9)."""
PKCE_VERIFIER_BYTES = 48
"""``secrets.token_urlsafe(48)`` gives 64 chars: within RFC 7636 §4.1's 43-128."""

# Extra authorization parameters per provider: Google issues a refresh token
# only with access_type=offline, and again after the first consent only with
# prompt=consent (developers.google.com/identity/protocols/oauth2/web-server).
# Microsoft issues one when the scope holds offline_access.
_EXTRA_AUTHORIZE_PARAMS: dict[Provider, dict[str, str]] = {
    Provider.GMAIL: {"access_type": "offline", "prompt": "consent"},
    Provider.OUTLOOK: {"prompt": "select_account"},
}
# Google sets email_verified; Microsoft's tokens carry no such claim (the
# address is the Exchange mailbox the IMAP login then proves).
_REQUIRE_EMAIL_VERIFIED = frozenset({Provider.GMAIL})


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    """Capped, jittered exponential backoff for transient provider errors.

    Attributes:
        attempts: total tries (≥ 1).
        initial_seconds: scale of the first wait.
        max_seconds: cap of one wait (``sync.reconnect_backoff_max_seconds``).
    """

    attempts: int = 4
    initial_seconds: float = 0.5
    max_seconds: float = 30.0


@dataclass(frozen=True, slots=True, kw_only=True)
class ProviderProfile:
    """One OAuth provider's client registration and endpoints (from ``[providers.*]``)."""

    provider: Provider
    client_id: str
    client_secret: str
    authorize_url: str
    token_url: str
    userinfo_url: str | None
    revoke_url: str | None
    issuer: str | None
    jwks_url: str | None
    scopes: tuple[str, ...]
    ca_file: str | None
    refresh_ahead_seconds: int

    @classmethod
    def from_settings(cls, provider: Provider, section: ProviderSettings) -> ProviderProfile:
        """Build from ``[providers.<name>]``.

        Raises:
            PermanentError: client_id, client_secret, authorize_url or token_url is unset.
        """
        missing = [
            key
            for key in ("client_id", "client_secret", "authorize_url", "token_url")
            if getattr(section, key) is None
        ]
        if missing:
            names = ", ".join(f"providers.{provider.value}.{k}" for k in missing)
            raise PermanentError(f"{provider.value} is not configured: set {names}")
        assert section.client_id and section.client_secret  # noqa: S101 (checked above)
        assert section.authorize_url and section.token_url  # noqa: S101
        return cls(
            provider=provider,
            client_id=section.client_id,
            client_secret=section.client_secret.get_secret_value(),
            authorize_url=section.authorize_url,
            token_url=section.token_url,
            userinfo_url=section.userinfo_url,
            revoke_url=section.revoke_url,
            issuer=section.issuer,
            jwks_url=section.jwks_url,
            scopes=section.scopes,
            ca_file=str(section.ca_file) if section.ca_file else None,
            refresh_ahead_seconds=section.refresh_ahead_seconds,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class TokenSet:
    """A token endpoint answer (RFC 6749 §5.1). ``expires_at`` is aware UTC or None."""

    access_token: str
    refresh_token: str | None
    expires_at: datetime | None
    id_token: str | None

    def __repr__(self) -> str:
        return f"TokenSet(expires_at={self.expires_at!r}, <redacted>)"


@dataclass(frozen=True, slots=True, kw_only=True)
class VerifiedIdentity:
    """The address the provider vouches for, and its stable subject id (``sub``)."""

    address: str
    subject: str


def new_code_verifier() -> str:
    """Return a fresh PKCE code verifier (RFC 7636 §4.1; 64 URL-safe chars)."""
    return secrets.token_urlsafe(PKCE_VERIFIER_BYTES)


def classify(exc: BaseException) -> type[Exception]:
    """Return the edge error class of an exception raised while talking to a provider.

    Returns:
        ``AuthError`` for ``invalid_grant`` (RFC 6749 §5.2), ``TransientError``
        for 5xx/429 answers and transport failures (timeouts, refused
        connections), ``PermanentError`` for everything else (other OAuth
        errors such as ``invalid_client``, 4xx, non-JSON answers).
    """
    if isinstance(exc, TransientError | AuthError | PermanentError):
        return type(exc)
    if isinstance(exc, OAuthError):
        return AuthError if exc.error == "invalid_grant" else PermanentError
    if isinstance(exc, httpx.HTTPStatusError):
        status = exc.response.status_code
        return TransientError if status >= 500 or status == 429 else PermanentError
    if isinstance(exc, httpx.TransportError | TimeoutError | ConnectionError):
        return TransientError
    return PermanentError


def describe(exc: BaseException) -> str:
    """Return a short, secret-free description of a provider error for users and logs."""
    if isinstance(exc, OAuthError):
        return f"{exc.error}: {exc.description}" if exc.description else str(exc.error)
    if isinstance(exc, httpx.HTTPStatusError):
        return f"HTTP {exc.response.status_code} from {exc.request.url.copy_with(query=None)}"
    if isinstance(exc, httpx.TransportError):
        return f"{type(exc).__name__} talking to the provider"
    return str(exc) or type(exc).__name__


def _verify(profile: ProviderProfile) -> ssl.SSLContext | bool:
    """TLS verification for the provider's endpoints: never off; extra CA when configured."""
    if profile.ca_file:
        return ssl.create_default_context(cafile=profile.ca_file)
    return True


def _client(profile: ProviderProfile, **kwargs: Any) -> AsyncOAuth2Client:
    return AsyncOAuth2Client(
        client_id=profile.client_id,
        client_secret=profile.client_secret,
        scope=" ".join(profile.scopes),
        code_challenge_method="S256",
        token_endpoint_auth_method="client_secret_post",  # noqa: S106 (a method name)
        timeout=HTTP_TIMEOUT_SECONDS,
        verify=_verify(profile),
        **kwargs,
    )


def authorization_url(
    profile: ProviderProfile,
    *,
    redirect_uri: str,
    state: str,
    code_verifier: str,
    nonce: str,
    login_hint: str | None = None,
) -> str:
    """Return the URL of the provider's consent page (RFC 6749 §4.1.1, RFC 7636 §4.3).

    Pure: builds a URL, no request. Carries ``code_challenge`` (S256 of
    ``code_verifier``), ``state``, the OIDC ``nonce``, the scopes and the
    provider's offline-access parameters.
    """
    client = _client(profile, redirect_uri=redirect_uri)
    extra = dict(_EXTRA_AUTHORIZE_PARAMS.get(profile.provider, {}))
    if login_hint:
        extra["login_hint"] = login_hint
    url, _ = client.create_authorization_url(
        profile.authorize_url, state=state, code_verifier=code_verifier, nonce=nonce, **extra
    )
    return str(url)


async def with_retry(
    call: Callable[[], Awaitable[T]],
    policy: RetryPolicy,
    sleep: Callable[[float], Awaitable[None]] | None = None,
) -> T:
    """Await ``call()``; on a transient error retry with jittered backoff, else raise the class.

    Raises:
        TransientError: still failing after ``policy.attempts`` tries.
        AuthError: ``invalid_grant``.
        PermanentError: any other provider error.
    """
    retrying = AsyncRetrying(
        sleep=sleep or asyncio.sleep,
        retry=retry_if_exception_type(TransientError),
        wait=wait_random_exponential(multiplier=policy.initial_seconds, max=policy.max_seconds),
        stop=stop_after_attempt(policy.attempts),
        reraise=True,
    )
    async for attempt in retrying:
        with attempt:
            try:
                return await call()
            except Exception as exc:
                kind = classify(exc)
                if kind is TransientError:
                    log.warning("oauth request failed, retrying", extra={"reason": describe(exc)})
                raise kind(describe(exc)) from exc
    raise AssertionError("unreachable")  # pragma: no cover


def _token_set(raw: dict[str, Any], now: datetime, previous_refresh: str | None) -> TokenSet:
    access = raw.get("access_token")
    if not isinstance(access, str) or not access:
        raise PermanentError("token endpoint answered without an access_token")
    expires_in = raw.get("expires_in")
    expires_at = now + timedelta(seconds=int(expires_in)) if expires_in is not None else None
    refresh = raw.get("refresh_token") or previous_refresh
    id_token = raw.get("id_token")
    return TokenSet(
        access_token=access,
        refresh_token=str(refresh) if refresh else None,
        expires_at=expires_at,
        id_token=str(id_token) if id_token else None,
    )


async def exchange_code(
    profile: ProviderProfile,
    *,
    code: str,
    redirect_uri: str,
    code_verifier: str,
    now: datetime,
    policy: RetryPolicy,
) -> TokenSet:
    """Exchange an authorization code for tokens (RFC 6749 §4.1.3, RFC 7636 §4.5).

    Raises:
        TransientError, AuthError, PermanentError: as ``with_retry``.
    """

    async def call() -> dict[str, Any]:
        async with _client(profile, redirect_uri=redirect_uri) as client:
            token = await client.fetch_token(
                profile.token_url, code=code, code_verifier=code_verifier
            )
            return dict(token)

    return _token_set(await with_retry(call, policy), now, None)


async def refresh_access_token(
    profile: ProviderProfile,
    refresh_token: str,
    *,
    now: datetime,
    policy: RetryPolicy,
    sleep: Callable[[float], Awaitable[None]] | None = None,
) -> TokenSet:
    """Get a new access token with a refresh token (RFC 6749 §6).

    Microsoft returns a new refresh token each time (use it); Google
    returns none (keep the old one): the result always holds the one to keep.

    Raises:
        AuthError: ``invalid_grant`` (consent revoked, password changed, R22).
        TransientError: still 5xx / timing out after the retries.
        PermanentError: any other answer (wrong client secret, HTML).
    """

    async def call() -> dict[str, Any]:
        async with _client(profile) as client:
            token = await client.refresh_token(profile.token_url, refresh_token=refresh_token)
            return dict(token)

    return _token_set(await with_retry(call, policy, sleep), now, refresh_token)


async def revoke_token(profile: ProviderProfile, token: str, hint: str) -> bool:
    """Revoke a token at the provider's revocation endpoint (RFC 7009 §2.1), when it has one.

    Args:
        token: the refresh token (at Google, revoking it ends the whole grant).
        hint: ``refresh_token`` or ``access_token`` (RFC 7009 §2.1 token_type_hint).

    Returns:
        True when revoked; False when the provider has no endpoint (Microsoft)
        or the request failed (logged: the tokens are deleted here anyway).
    """
    if profile.revoke_url is None:
        return False
    try:
        async with _client(profile) as client:
            response = await client.revoke_token(
                profile.revoke_url, token=token, token_type_hint=hint
            )
            response.raise_for_status()
    except (httpx.HTTPError, OAuthError) as exc:
        log.warning("token revocation failed", extra={"reason": describe(exc)})
        return False
    return True


async def verified_identity(
    profile: ProviderProfile, tokens: TokenSet, *, nonce: str, now: datetime
) -> VerifiedIdentity:
    """Return the address the provider vouches for (OIDC Core §3.1.3.7, §5.3).

    The ID token's signature (HS256 with the client secret, OIDC Core
    §10.1, or RS256 with the provider's JWKS), ``iss`` (when configured),
    ``aud``, ``exp`` and ``nonce`` are checked; then the UserInfo endpoint
    is asked with the new access token, its ``sub`` must equal the ID
    token's, and its ``email`` (else the ID token's) is the address. Google
    must also say ``email_verified``.

    Raises:
        PermanentError: no ID token, a bad signature or claim, no email, or
            an unverified email; TransientError: UserInfo unreachable.
    """
    if tokens.id_token is None:
        raise PermanentError("provider returned no id_token (is 'openid' in the scopes?)")
    claims = await _id_token_claims(profile, tokens.id_token, nonce=nonce, now=now)
    info: dict[str, Any] = {}
    if profile.userinfo_url is not None:
        info = await with_retry(lambda: _userinfo(profile, tokens.access_token), RetryPolicy())
        if str(info.get("sub")) != str(claims.get("sub")):
            raise PermanentError("userinfo subject differs from the id_token subject")
    email = info.get("email") or claims.get("email")
    if not isinstance(email, str) or "@" not in email:
        raise PermanentError("provider did not return an email address")
    verified = info.get("email_verified", claims.get("email_verified"))
    if profile.provider in _REQUIRE_EMAIL_VERIFIED and verified not in (True, "true"):
        raise PermanentError("provider says the email address is not verified")
    return VerifiedIdentity(address=email.strip(), subject=str(claims["sub"]))


async def _id_token_claims(
    profile: ProviderProfile, id_token: str, *, nonce: str, now: datetime
) -> dict[str, Any]:
    try:
        alg = _jwt_alg(id_token)
        if alg == "HS256":
            token = jwt.decode(id_token, OctKey.import_key(profile.client_secret), ["HS256"])
        elif alg == "RS256" and profile.jwks_url is not None:
            token = jwt.decode(id_token, await _jwks(profile), ["RS256"])
        else:
            raise PermanentError(f"id_token algorithm {alg} cannot be verified")
        options: dict[str, Any] = {
            "aud": {"essential": True, "value": profile.client_id},
            "exp": {"essential": True},
            "sub": {"essential": True},
            "nonce": {"essential": True, "value": nonce},
        }
        if profile.issuer is not None:
            options["iss"] = {"essential": True, "value": profile.issuer}
        registry = jwt.JWTClaimsRegistry(
            now=int(now.timestamp()), leeway=ID_TOKEN_LEEWAY_SECONDS, **options
        )
        registry.validate(token.claims)
    except JoseError as exc:
        raise PermanentError(f"id_token rejected: {exc.error}") from exc
    return dict(token.claims)


def _jwt_alg(token: str) -> str:
    """Return the ``alg`` of a compact JWS header (RFC 7515 §7.1), unverified."""
    try:
        segment = token.split(".", 1)[0]
        header = json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
    except (ValueError, binascii.Error) as exc:
        raise PermanentError("id_token is not a JWT") from exc
    return str(header.get("alg")) if isinstance(header, dict) else ""


async def _jwks(profile: ProviderProfile) -> KeySet:
    assert profile.jwks_url is not None  # noqa: S101 (caller checked)
    async with httpx.AsyncClient(timeout=HTTP_TIMEOUT_SECONDS, verify=_verify(profile)) as client:
        response = await client.get(profile.jwks_url)
        response.raise_for_status()
        return KeySet.import_key_set(response.json())


async def _userinfo(profile: ProviderProfile, access_token: str) -> dict[str, Any]:
    assert profile.userinfo_url is not None  # noqa: S101 (caller checked)
    async with httpx.AsyncClient(timeout=HTTP_TIMEOUT_SECONDS, verify=_verify(profile)) as client:
        response = await client.get(
            profile.userinfo_url, headers={"Authorization": f"Bearer {access_token}"}
        )
        response.raise_for_status()
        body = response.json()
    if not isinstance(body, dict):
        raise PermanentError("userinfo answer is not a JSON object")
    return body

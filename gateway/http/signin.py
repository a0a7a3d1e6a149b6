"""Sign-in links for the settings page: an HMAC-signed, expiring ``{user_id, subaccount_id}``.

Edge module: itsdangerous' ``URLSafeTimedSerializer`` (HMAC-SHA1 over the
payload and a timestamp, keyed by ``http.session_secret`` with its own salt,
so a link is never valid as a session cookie and vice versa). Minted by
``mailgate settings-link``; checked by ``GET /settings/login``. A stand-in
for the CRM's real sign-in.
"""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass

from itsdangerous import BadSignature, SignatureExpired, URLSafeTimedSerializer

from gateway.config import Settings

LOGIN_SALT = "mailgate settings login v1"
LOGIN_PATH = "/settings/login"


class SettingsDisabled(RuntimeError):
    """``http.session_secret`` is not set, so the settings page is off."""


class InvalidSignIn(ValueError):
    """A sign-in token is malformed, altered, or expired; ``expired`` says which."""

    def __init__(self, message: str, *, expired: bool) -> None:
        super().__init__(message)
        self.expired = expired


@dataclass(frozen=True, slots=True, kw_only=True)
class SignIn:
    """Who a sign-in link is for: a user within one sub-account."""

    user_id: int
    subaccount_id: int


def session_secret(settings: Settings) -> str:
    """Return ``http.session_secret`` (raises ``SettingsDisabled`` when unset)."""
    secret = settings.http.session_secret
    if secret is None or not secret.get_secret_value():
        raise SettingsDisabled("http.session_secret is not set: the settings page is disabled")
    return secret.get_secret_value()


def _serializer(settings: Settings) -> URLSafeTimedSerializer:
    return URLSafeTimedSerializer(session_secret(settings), salt=LOGIN_SALT)


def mint_token(settings: Settings, sign_in: SignIn) -> str:
    """Return a URL-safe signed token for ``sign_in`` (raises ``SettingsDisabled``)."""
    payload = {"user_id": sign_in.user_id, "subaccount_id": sign_in.subaccount_id}
    token = _serializer(settings).dumps(payload)
    return token if isinstance(token, str) else token.decode("ascii")


def login_url(settings: Settings, sign_in: SignIn) -> str:
    """Return ``{http.public_url}/settings/login?token=…``."""
    query = urllib.parse.urlencode({"token": mint_token(settings, sign_in)})
    return f"{settings.http.public_url.rstrip('/')}{LOGIN_PATH}?{query}"


def check_token(settings: Settings, token: str) -> SignIn:
    """Verify a token's signature and age (``http.login_link_ttl_seconds``).

    Raises:
        InvalidSignIn: altered, malformed or expired.
        SettingsDisabled: no ``http.session_secret``.
    """
    try:
        payload = _serializer(settings).loads(token, max_age=settings.http.login_link_ttl_seconds)
    except SignatureExpired:
        raise InvalidSignIn("this sign-in link has expired", expired=True) from None
    except BadSignature:
        raise InvalidSignIn("this sign-in link is not valid", expired=False) from None
    try:
        return SignIn(user_id=int(payload["user_id"]), subaccount_id=int(payload["subaccount_id"]))
    except (KeyError, TypeError, ValueError):
        raise InvalidSignIn("this sign-in link is not valid", expired=False) from None

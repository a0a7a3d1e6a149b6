"""In-memory records of the local OAuth2 server: clients, codes, tokens, grants.

The objects implement authlib's model mixins (RFC 6749 client, authorization
code, token) so authlib's grant classes can use them. Holds state only; the
HTTP endpoints live in :mod:`tests.testbed.oauth_server`. Must not do I/O.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass, field

from authlib.oauth2.rfc6749 import AuthorizationCodeMixin, ClientMixin, TokenMixin

#: Client authentication methods both providers accept at the token endpoint.
CLIENT_AUTH_METHODS = ("client_secret_basic", "client_secret_post")


@dataclass(kw_only=True)
class Client(ClientMixin):  # type: ignore[misc]
    """A registered OAuth client (a "web application" in Google/Entra terms)."""

    flavour: str
    client_id: str
    client_secret: str
    redirect_uris: tuple[str, ...]

    def get_client_id(self) -> str:
        return self.client_id

    def get_default_redirect_uri(self) -> str:
        return self.redirect_uris[0]

    def get_allowed_scope(self, scope: str) -> str:
        return scope

    def check_redirect_uri(self, redirect_uri: str) -> bool:
        return redirect_uri in self.redirect_uris

    def check_client_secret(self, client_secret: str) -> bool:
        return client_secret == self.client_secret

    def check_endpoint_auth_method(self, method: str, endpoint: str) -> bool:
        return method in CLIENT_AUTH_METHODS

    def check_response_type(self, response_type: str) -> bool:
        return response_type == "code"

    def check_grant_type(self, grant_type: str) -> bool:
        return grant_type in ("authorization_code", "refresh_token")


@dataclass(kw_only=True)
class AuthCode(AuthorizationCodeMixin):  # type: ignore[misc]
    """An issued authorization code (single use, RFC 6749 §4.1.2)."""

    code: str
    client_id: str
    redirect_uri: str
    scope: str
    user: str
    code_challenge: str
    code_challenge_method: str
    offline: bool
    nonce: str | None
    issued_at: float = field(default_factory=time.time)

    def get_redirect_uri(self) -> str:
        return self.redirect_uri

    def get_scope(self) -> str:
        return self.scope


@dataclass(kw_only=True)
class TokenRecord(TokenMixin):  # type: ignore[misc]
    """One token response: an access token and maybe a refresh token."""

    flavour: str
    client_id: str
    user: str
    scope: str
    access_token: str
    refresh_token: str | None
    expires_in: int
    issued_at: float = field(default_factory=time.time)
    access_revoked: bool = False
    refresh_revoked: bool = False

    def check_client(self, client: Client) -> bool:
        return bool(client.client_id == self.client_id)

    def get_scope(self) -> str:
        return self.scope

    def get_expires_in(self) -> int:
        return self.expires_in

    def is_expired(self) -> bool:
        return time.time() >= self.issued_at + self.expires_in

    def is_revoked(self) -> bool:
        return self.refresh_revoked


@dataclass(kw_only=True)
class Store:
    """Everything the server remembers; guard every access with ``lock``."""

    lock: threading.RLock = field(default_factory=threading.RLock)
    clients: dict[tuple[str, str], Client] = field(default_factory=dict)
    codes: dict[str, AuthCode] = field(default_factory=dict)
    tokens: list[TokenRecord] = field(default_factory=list)
    #: (flavour, client_id, user) that have been issued a refresh token once.
    consented: set[tuple[str, str, str]] = field(default_factory=set)
    request_counts: Counter[str] = field(default_factory=Counter)
    revoked_tokens: list[str] = field(default_factory=list)
    token_ttl_seconds: int = 3600
    #: Pending injected failures of POST /token: (status, content_type, body).
    token_failures: list[tuple[int, str, str]] = field(default_factory=list)

    def find_access(self, access_token: str) -> TokenRecord | None:
        """Return the record holding ``access_token``, or None."""
        with self.lock:
            return next((t for t in self.tokens if t.access_token == access_token), None)

    def find_refresh(self, refresh_token: str) -> TokenRecord | None:
        """Return the record holding ``refresh_token``, or None."""
        with self.lock:
            return next((t for t in self.tokens if t.refresh_token == refresh_token), None)

"""authlib grant and endpoint classes of the local OAuth2 server.

Authorization code with PKCE S256 required (RFC 6749 §4.1, RFC 7636), refresh
token (RFC 6749 §6), revocation (RFC 7009). Offline access follows each
provider: Google issues a refresh token for ``access_type=offline`` on the
first consent and again only with ``prompt=consent``; Microsoft issues one
when the scope holds ``offline_access`` and rotates it on every refresh.
Must not serve HTTP; :mod:`tests.testbed.oauth_server` wires these in.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from authlib.oauth2.rfc6749 import InvalidRequestError, grants
from authlib.oauth2.rfc7009 import RevocationEndpoint
from authlib.oauth2.rfc7636 import CodeChallenge

from tests.testbed.oauth_store import AuthCode, Client, TokenRecord

if TYPE_CHECKING:
    from tests.testbed.oauth_server import OAuthProvider

GOOGLE = "google"
MICROSOFT = "microsoft"
FLAVOURS = (GOOGLE, MICROSOFT)


class S256Challenge(CodeChallenge):  # type: ignore[misc]
    """PKCE with ``code_challenge`` required and S256 the only method (RFC 7636 §4.2)."""

    SUPPORTED_CODE_CHALLENGE_METHOD = ["S256"]  # noqa: RUF012 - authlib's attribute

    def validate_code_challenge(self, grant: Any, redirect_uri: str) -> None:
        data = grant.request.payload.data
        if not data.get("code_challenge"):
            raise InvalidRequestError("Missing 'code_challenge' (PKCE is required)")
        if data.get("code_challenge_method") != "S256":
            raise InvalidRequestError("'code_challenge_method' must be S256")
        super().validate_code_challenge(grant, redirect_uri)

    def get_authorization_code_challenge(self, authorization_code: AuthCode) -> str:
        return authorization_code.code_challenge

    def get_authorization_code_challenge_method(self, authorization_code: AuthCode) -> str:
        return authorization_code.code_challenge_method


def make_grants(provider: OAuthProvider, flavour: str) -> tuple[type, type, type]:
    """Return (code grant, refresh grant, revocation endpoint) classes bound to one flavour."""

    class CodeGrant(grants.AuthorizationCodeGrant):  # type: ignore[misc]
        TOKEN_ENDPOINT_AUTH_METHODS = ["client_secret_basic", "client_secret_post"]  # noqa: RUF012

        def save_authorization_code(self, code: str, request: Any) -> None:
            data = request.payload.data
            scope = data.get("scope", "")
            offline = (
                data.get("access_type") == "offline"
                if flavour == GOOGLE
                else "offline_access" in scope.split()
            )
            record = AuthCode(
                code=code,
                client_id=request.client.client_id,
                redirect_uri=data.get("redirect_uri", ""),
                scope=scope,
                user=request.user,
                code_challenge=data.get("code_challenge", ""),
                code_challenge_method=data.get("code_challenge_method", ""),
                offline=offline and _may_issue_refresh(provider, flavour, request, data),
                nonce=data.get("nonce"),
            )
            with provider.store.lock:
                provider.store.codes[code] = record

        def query_authorization_code(self, code: str, client: Client) -> AuthCode | None:
            with provider.store.lock:
                record = provider.store.codes.get(code)
            if record is None or record.client_id != client.client_id:
                return None
            return record

        def delete_authorization_code(self, authorization_code: AuthCode) -> None:
            with provider.store.lock:
                provider.store.codes.pop(authorization_code.code, None)

        def authenticate_user(self, authorization_code: AuthCode) -> str:
            return authorization_code.user

        def generate_token(
            self,
            user: str | None = None,
            scope: str | None = None,
            grant_type: str | None = None,
            expires_in: int | None = None,
            include_refresh_token: bool = True,
        ) -> dict[str, Any]:
            code: AuthCode = self.request.authorization_code
            return provider.issue(
                flavour,
                self.request.client,
                str(user),
                scope or "",
                refresh=code.offline,
                nonce=code.nonce,
            )

    class RefreshGrant(grants.RefreshTokenGrant):  # type: ignore[misc]
        TOKEN_ENDPOINT_AUTH_METHODS = ["client_secret_basic", "client_secret_post"]  # noqa: RUF012

        def authenticate_refresh_token(self, refresh_token: str) -> TokenRecord | None:
            record = provider.store.find_refresh(refresh_token)
            if record is None or record.refresh_revoked or record.flavour != flavour:
                return None
            return record

        def authenticate_user(self, refresh_token: TokenRecord) -> str:
            return refresh_token.user

        def revoke_old_credential(self, refresh_token: TokenRecord) -> None:
            """Keep it valid: neither provider revokes a refresh token on use."""

        def generate_token(
            self,
            user: str | None = None,
            scope: str | None = None,
            grant_type: str | None = None,
            expires_in: int | None = None,
            include_refresh_token: bool = True,
        ) -> dict[str, Any]:
            return provider.issue(
                flavour,
                self.request.client,
                str(user),
                scope or "",
                refresh=flavour == MICROSOFT,
                nonce=None,
            )

    class Revocation(RevocationEndpoint):  # type: ignore[misc]
        CLIENT_AUTH_METHODS = ["client_secret_basic", "client_secret_post"]  # noqa: RUF012

        def query_token(self, token_string: str, token_type_hint: str | None) -> Any:
            store = provider.store
            return store.find_refresh(token_string) or store.find_access(token_string)

        def revoke_token(self, token: TokenRecord, request: Any) -> None:
            provider.revoke_record(token, request.form["token"])

    return CodeGrant, RefreshGrant, Revocation


def _may_issue_refresh(provider: OAuthProvider, flavour: str, request: Any, data: Any) -> bool:
    """Google re-issues a refresh token only on first consent or ``prompt=consent``."""
    if flavour != GOOGLE:
        return True
    key = (flavour, request.client.client_id, str(request.user))
    with provider.store.lock:
        first = key not in provider.store.consented
        provider.store.consented.add(key)
    return first or "consent" in str(data.get("prompt", "")).split()

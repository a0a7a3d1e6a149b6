"""A local OAuth2 authorization server that behaves like Google's and Microsoft's.

One Flask app (authlib's Flask integration) served by werkzeug in a thread on
127.0.0.1, with two flavours under ``/google/...`` and ``/microsoft/...``:

* ``GET /authorize``: consent page (scopes, account field prefilled from
  ``login_hint``, Allow/Deny); ``POST /authorize`` redirects to the client with
  ``code`` + ``state``, or ``error=access_denied`` (RFC 6749 §4.1.2).
* ``POST /token``: ``authorization_code`` with PKCE S256 required (RFC 7636)
  and ``refresh_token`` (RFC 6749 §6); an OIDC ``id_token`` when ``openid`` is
  in scope, HS256-signed with the client secret (OIDC Core §10.1).
* ``GET /userinfo`` (OIDC Core §5.3) and ``POST /revoke`` (RFC 7009; Google only:
  Microsoft has no revocation endpoint, so its ``revoke_url`` is None).

Access tokens are JWTs from :class:`tests.testbed.tokens.TokenKeys` with
``sub`` = the mailbox address, which Dovecot and the submission stand-in
validate. Test controls are plain methods (see docs/testbed.md). Must not
listen beyond loopback.
"""

from __future__ import annotations

import hashlib
import html
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Any

from authlib.integrations.flask_oauth2 import AuthorizationServer
from authlib.oauth2 import OAuth2Error
from flask import Flask, Response, jsonify, request
from joserfc import jwt
from joserfc.jwk import OctKey
from werkzeug.serving import BaseWSGIServer, make_server

from tests.testbed.oauth_grants import FLAVOURS, GOOGLE, MICROSOFT, S256Challenge, make_grants
from tests.testbed.oauth_store import Client, Store, TokenRecord
from tests.testbed.tokens import TokenKeys

#: Scopes each flavour's mail access uses (the real providers' values).
GOOGLE_MAIL_SCOPE = "https://mail.google.com/"
MICROSOFT_IMAP_SCOPE = "https://outlook.office.com/IMAP.AccessAsUser.All"
MICROSOFT_SMTP_SCOPE = "https://outlook.office.com/SMTP.Send"
ENDPOINT_NAMES = ("authorize", "token", "userinfo", "revoke")


@dataclass(frozen=True, slots=True, kw_only=True)
class ProviderEndpoints:
    """The config values a client needs for one flavour (all http://127.0.0.1:PORT/...)."""

    flavour: str
    issuer: str
    authorize_url: str
    token_url: str
    userinfo_url: str
    revoke_url: str | None


@dataclass(frozen=True, slots=True, kw_only=True)
class RegisteredClient:
    """A client registered by a test: what it puts in its config."""

    flavour: str
    client_id: str
    client_secret: str
    redirect_uris: tuple[str, ...]


class OAuthProvider:
    """The server object: lifecycle, endpoints and test controls."""

    host = "127.0.0.1"

    def __init__(self, keys: TokenKeys) -> None:
        """Build (not start) the server; ``keys`` signs the access tokens."""
        self.keys = keys
        self.store = Store()
        self.app = Flask("mailgate-testbed-oauth")
        self._servers = {flavour: self._auth_server(flavour) for flavour in FLAVOURS}
        self._routes()
        self._http: BaseWSGIServer | None = None
        self._thread: threading.Thread | None = None

    # ----------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Bind a free loopback port and serve in a daemon thread."""
        self._http = make_server(self.host, 0, self.app, threaded=True)
        self._thread = threading.Thread(
            target=self._http.serve_forever, name="testbed-oauth", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop serving and join the thread; idempotent."""
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT``; raises if not started."""
        assert self._http is not None, "OAuthProvider not started"
        return f"http://{self.host}:{self._http.server_port}"

    def endpoints(self, flavour: str) -> ProviderEndpoints:
        """Return the endpoint URLs of ``flavour`` (``"google"`` or ``"microsoft"``)."""
        base = f"{self.base_url}/{flavour}"
        return ProviderEndpoints(
            flavour=flavour,
            issuer=base,
            authorize_url=f"{base}/authorize",
            token_url=f"{base}/token",
            userinfo_url=f"{base}/userinfo",
            revoke_url=f"{base}/revoke" if flavour == GOOGLE else None,
        )

    # ------------------------------------------------------- test controls

    def register_client(
        self,
        flavour: str,
        redirect_uris: tuple[str, ...],
        *,
        client_id: str | None = None,
        client_secret: str | None = None,
    ) -> RegisteredClient:
        """Register a confidential client; id and secret are random unless given."""
        if flavour not in FLAVOURS:
            raise ValueError(f"unknown flavour {flavour!r}")
        client = Client(
            flavour=flavour,
            client_id=client_id or f"client-{secrets.token_hex(6)}",
            client_secret=client_secret or secrets.token_urlsafe(32),
            redirect_uris=tuple(redirect_uris),
        )
        with self.store.lock:
            self.store.clients[(flavour, client.client_id)] = client
        return RegisteredClient(
            flavour=flavour,
            client_id=client.client_id,
            client_secret=client.client_secret,
            redirect_uris=client.redirect_uris,
        )

    def set_token_ttl(self, seconds: int) -> None:
        """Set ``expires_in`` (and JWT ``exp``) of access tokens issued from now on."""
        with self.store.lock:
            self.store.token_ttl_seconds = seconds

    def expire_access_tokens(self, user: str) -> None:
        """Make every access token issued so far for ``user`` invalid everywhere.

        Dovecot and the submission server reject them from the next login on
        (the user's JWT ``kid`` is retired); ``/userinfo`` answers 401. Refresh
        tokens keep working, like a Google access token past its hour.
        """
        with self.store.lock:
            for record in self.store.tokens:
                if record.user == user:
                    record.access_revoked = True
        self.keys.retire(user)

    def revoke_grant(self, user: str) -> None:
        """Revoke ``user``'s consent: refreshes answer ``invalid_grant``, tokens die."""
        with self.store.lock:
            for record in self.store.tokens:
                if record.user == user:
                    record.refresh_revoked = True
            self.store.consented = {c for c in self.store.consented if c[2] != user}
        self.expire_access_tokens(user)

    def fail_next_token_requests(
        self,
        count: int,
        *,
        status: int = 503,
        content_type: str = "application/json",
        body: str = '{"error": "temporarily_unavailable"}',
    ) -> None:
        """Answer the next ``count`` POST /token requests (any flavour) with ``status``."""
        with self.store.lock:
            self.store.token_failures.extend([(status, content_type, body)] * count)

    def request_count(self, flavour: str, endpoint: str) -> int:
        """Return how many requests ``endpoint`` (ENDPOINT_NAMES) of ``flavour`` got."""
        with self.store.lock:
            return self.store.request_counts[f"{flavour}/{endpoint}"]

    def revoked_tokens(self) -> tuple[str, ...]:
        """Return the token strings revoked through ``/revoke``, oldest first."""
        with self.store.lock:
            return tuple(self.store.revoked_tokens)

    # ------------------------------------------------- used by the grants

    def issue(
        self,
        flavour: str,
        client: Client,
        user: str,
        scope: str,
        *,
        refresh: bool,
        nonce: str | None,
    ) -> dict[str, Any]:
        """Mint, record and return one token response (RFC 6749 §5.1)."""
        ttl = self.store.token_ttl_seconds
        access = self.keys.mint(
            user,
            ttl_seconds=ttl,
            extra_claims={
                "email": user,
                "scope": scope,
                "aud": client.client_id,
                "iss": self.endpoints(flavour).issuer,
            },
        )
        token: dict[str, Any] = {
            "access_token": access,
            "token_type": "Bearer",
            "expires_in": ttl,
            "scope": scope,
        }
        if refresh:
            token["refresh_token"] = secrets.token_urlsafe(48)
        if flavour == MICROSOFT:
            token["ext_expires_in"] = ttl
        if "openid" in scope.split():
            token["id_token"] = self._id_token(flavour, client, user, nonce)
        record = TokenRecord(
            flavour=flavour,
            client_id=client.client_id,
            user=user,
            scope=scope,
            access_token=access,
            refresh_token=token.get("refresh_token"),
            expires_in=ttl,
        )
        with self.store.lock:
            self.store.tokens.append(record)
        return token

    def revoke_record(self, record: TokenRecord, token_string: str) -> None:
        """Revoke one token; revoking a refresh token ends the whole grant (Google)."""
        with self.store.lock:
            self.store.revoked_tokens.append(token_string)
            if token_string == record.refresh_token:
                record.refresh_revoked = True
            record.access_revoked = True
        if token_string == record.refresh_token:
            self.revoke_grant(record.user)

    def _id_token(self, flavour: str, client: Client, user: str, nonce: str | None) -> str:
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": self.endpoints(flavour).issuer,
            "aud": client.client_id,
            "sub": subject_id(user),
            "email": user,
            "email_verified": True,
            "iat": now,
            "exp": now + 3600,
        }
        if nonce:
            claims["nonce"] = nonce
        if flavour == MICROSOFT:
            claims["preferred_username"] = user
        key = OctKey.import_key(client.client_secret.encode())
        return jwt.encode({"alg": "HS256", "typ": "JWT"}, claims, key, algorithms=["HS256"])

    # ----------------------------------------------------------------- HTTP

    def _auth_server(self, flavour: str) -> AuthorizationServer:
        def query_client(client_id: str) -> Client | None:
            with self.store.lock:
                return self.store.clients.get((flavour, client_id))

        server = AuthorizationServer(query_client=query_client, save_token=lambda t, r: None)
        server.init_app(self.app)
        code_grant, refresh_grant, revocation = make_grants(self, flavour)
        server.register_grant(code_grant, [S256Challenge(required=True)])
        server.register_grant(refresh_grant)
        server.register_endpoint(revocation)
        return server

    def _routes(self) -> None:
        app = self.app
        app.add_url_rule(
            "/<flavour>/authorize", "authorize", self._authorize, methods=["GET", "POST"]
        )
        app.add_url_rule("/<flavour>/token", "token", self._token, methods=["POST"])
        app.add_url_rule("/<flavour>/userinfo", "userinfo", self._userinfo, methods=["GET"])
        app.add_url_rule("/<flavour>/revoke", "revoke", self._revoke, methods=["POST"])

        @app.before_request
        def count() -> None:
            parts = request.path.strip("/").split("/")
            if len(parts) == 2 and parts[0] in FLAVOURS:
                with self.store.lock:
                    self.store.request_counts[f"{parts[0]}/{parts[1]}"] += 1

    def _authorize(self, flavour: str) -> Any:
        server = self._servers.get(flavour)
        if server is None:
            return Response("unknown provider", status=404)
        try:
            grant = server.get_consent_grant(end_user=None)
        except OAuth2Error as error:
            return server.handle_error_response(None, error)
        if request.method == "GET":
            return Response(consent_page(flavour, request.full_path), mimetype="text/html")
        user = request.form.get("login", "").strip().lower()
        allowed = request.form.get("decision") == "allow" and "@" in user
        return server.create_authorization_response(
            grant_user=user if allowed else None, grant=grant
        )

    def _token(self, flavour: str) -> Any:
        with self.store.lock:
            failure = self.store.token_failures.pop(0) if self.store.token_failures else None
        if failure is not None:
            status, content_type, body = failure
            return Response(body, status=status, content_type=content_type)
        server = self._servers.get(flavour)
        if server is None:
            return Response("unknown provider", status=404)
        return server.create_token_response()

    def _userinfo(self, flavour: str) -> Any:
        auth = request.headers.get("Authorization", "")
        record = self.store.find_access(auth[7:]) if auth.startswith("Bearer ") else None
        valid = record is not None and not record.access_revoked and not record.is_expired()
        if record is None or not valid or record.flavour != flavour:
            return Response(
                '{"error": "invalid_token"}',
                status=401,
                content_type="application/json",
                headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
            )
        return jsonify(sub=subject_id(record.user), email=record.user, email_verified=True)

    def _revoke(self, flavour: str) -> Any:
        if flavour != GOOGLE:
            return Response("no revocation endpoint", status=404)
        if "client_id" not in request.form and "Authorization" not in request.headers:
            return self._revoke_unauthenticated()
        return self._servers[GOOGLE].create_endpoint_response("revocation")

    def _revoke_unauthenticated(self) -> Any:
        """Google accepts ``token=`` without client credentials (its OAuth docs)."""
        token = request.values.get("token", "")
        record = self.store.find_refresh(token) or self.store.find_access(token)
        if record is None:
            return Response(
                '{"error": "invalid_token"}', status=400, content_type="application/json"
            )
        self.revoke_record(record, token)
        return jsonify({})


def subject_id(user: str) -> str:
    """Return a stable opaque 21-digit ``sub`` for ``user``, like Google's account ids."""
    return str(int.from_bytes(hashlib.sha256(user.encode()).digest()[:9], "big") % 10**21)


def consent_page(flavour: str, action: str) -> str:
    """Render the consent HTML: provider, requested scopes, account field, Allow/Deny.

    Args:
        flavour: ``"google"`` or ``"microsoft"``.
        action: path + query of the authorization request; the form POSTs back to it.
    """
    scopes = request.values.get("scope", "").split()
    hint = request.values.get("login_hint", "")
    items = "".join(f"<li class='scope'>{html.escape(s)}</li>" for s in scopes)
    return (
        "<!doctype html><html><head><title>Sign in - testbed "
        f"{html.escape(flavour)}</title></head><body>"
        f"<h1 id='provider'>{html.escape(flavour)}</h1>"
        f"<p>The application requests:</p><ul id='scopes'>{items}</ul>"
        f"<form method='post' action='{html.escape(action, quote=True)}'>"
        f"<label>Account <input id='login' name='login' type='email' "
        f"value='{html.escape(hint, quote=True)}'></label>"
        "<button id='allow' type='submit' name='decision' value='allow'>Allow</button>"
        "<button id='deny' type='submit' name='decision' value='deny'>Deny</button>"
        "</form></body></html>"
    )

"""Pure parts of the OAuth client: authorization URL (PKCE S256, state, offline), errors."""

from __future__ import annotations

import base64
import hashlib
import urllib.parse

import httpx2
from authlib.integrations.base_client.errors import OAuthError

from gateway.config import make_settings
from gateway.errors import AuthError, PermanentError, TransientError
from gateway.oauth import ProviderProfile, authorization_url, classify, new_code_verifier
from ingest.types import Provider

REDIRECT = "https://gw.example/oauth/callback"


def _profile(provider: Provider) -> ProviderProfile:
    settings = make_settings(
        providers={provider.value: {"client_id": "cid", "client_secret": "csecret"}}
    )
    return ProviderProfile.from_settings(provider, getattr(settings.providers, provider.value))


def _query(provider: Provider, verifier: str) -> dict[str, str]:
    url = authorization_url(
        _profile(provider), redirect_uri=REDIRECT, state="st", code_verifier=verifier, nonce="n"
    )
    return dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query))


def test_r19_google_url_has_pkce_s256_state_and_offline_access() -> None:
    verifier = new_code_verifier()
    assert 43 <= len(verifier) <= 128  # RFC 7636 §4.1
    query = _query(Provider.GMAIL, verifier)
    digest = hashlib.sha256(verifier.encode()).digest()
    assert query["code_challenge"] == base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
    assert query["code_challenge_method"] == "S256"
    assert (query["state"], query["nonce"], query["redirect_uri"]) == ("st", "n", REDIRECT)
    assert (query["access_type"], query["prompt"]) == ("offline", "consent")
    assert set(query["scope"].split()) == {"https://mail.google.com/", "openid", "email"}
    assert "csecret" not in str(query)


def test_r19_microsoft_url_asks_offline_access_scope() -> None:
    query = _query(Provider.OUTLOOK, new_code_verifier())
    scopes = set(query["scope"].split())
    assert {"offline_access", "https://outlook.office.com/IMAP.AccessAsUser.All"} <= scopes
    assert "access_type" not in query


def test_r22_classify_provider_errors() -> None:
    request = httpx2.Request("POST", "https://t.example/token")
    assert classify(OAuthError(error="invalid_grant")) is AuthError
    assert classify(OAuthError(error="invalid_client")) is PermanentError
    assert classify(httpx2.ConnectTimeout("t", request=request)) is TransientError
    for status, kind in ((503, TransientError), (429, TransientError), (400, PermanentError)):
        response = httpx2.Response(status, request=request)
        error = httpx2.HTTPStatusError("x", request=request, response=response)
        assert classify(error) is kind
    assert classify(ValueError("not JSON")) is PermanentError


def test_unconfigured_provider_is_a_clear_error() -> None:
    settings = make_settings()
    try:
        ProviderProfile.from_settings(Provider.GMAIL, settings.providers.gmail)
    except PermanentError as exc:
        assert "providers.gmail.client_id" in str(exc)
    else:
        raise AssertionError("expected PermanentError")

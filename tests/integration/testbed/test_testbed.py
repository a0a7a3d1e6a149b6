"""The local provider testbed works as its stand-ins promise (docs/testbed.md)."""

from __future__ import annotations

import email
import secrets
import time
from urllib.parse import parse_qs, urlsplit

import aiosmtplib
import pytest
import requests
from authlib.integrations.requests_client import OAuth2Session
from authlib.oauth2.rfc7636 import create_s256_code_challenge
from imapclient import IMAPClient  # type: ignore[import-untyped]
from imapclient.exceptions import LoginError  # type: ignore[import-untyped]

from tests.testbed.dovecot import Dovecot
from tests.testbed.dovecot_config import GMAIL_LAYOUT, OUTLOOK_LAYOUT
from tests.testbed.oauth_server import GOOGLE_MAIL_SCOPE, MICROSOFT_IMAP_SCOPE, OAuthProvider
from tests.testbed.plugin import TestbedUser
from tests.testbed.submission import REPLY_QUEUED, SubmissionServer

pytestmark = pytest.mark.integration

REDIRECT_URI = "http://127.0.0.1:9/callback"
GOOGLE_SCOPE = f"openid email {GOOGLE_MAIL_SCOPE}"
MICROSOFT_SCOPE = f"openid email offline_access {MICROSOFT_IMAP_SCOPE}"
IDLE_TIMEOUT_SECONDS = 5


def _consent(
    provider: OAuthProvider, flavour: str, user: str, *, decision: str = "allow", **params: str
) -> tuple[OAuth2Session, dict[str, list[str]], str]:
    """Run authorize → consent POST; return the session, callback query and verifier."""
    client = provider.register_client(flavour, (REDIRECT_URI,))
    scope = GOOGLE_SCOPE if flavour == "google" else MICROSOFT_SCOPE
    session = OAuth2Session(
        client.client_id,
        client.client_secret,
        scope=scope,
        redirect_uri=REDIRECT_URI,
        code_challenge_method="S256",
    )
    verifier = secrets.token_urlsafe(48)
    url, state = session.create_authorization_url(
        provider.endpoints(flavour).authorize_url, code_verifier=verifier, login_hint=user, **params
    )
    page = requests.get(url, timeout=5)
    assert page.status_code == 200 and user in page.text and "Allow" in page.text
    answer = requests.post(
        url, data={"login": user, "decision": decision}, allow_redirects=False, timeout=5
    )
    assert answer.status_code == 302
    location = answer.headers["Location"]
    assert location.startswith(REDIRECT_URI)
    query = parse_qs(urlsplit(location).query)
    assert query["state"] == [state]
    return session, query, verifier


def _imap_login(dovecot: Dovecot, user: str, token: str) -> list[bytes]:
    assert dovecot.ports is not None
    client = IMAPClient(
        "127.0.0.1", port=dovecot.ports.imaps, ssl_context=dovecot.ssl_context(), timeout=10
    )
    try:
        return list(client.oauth2_login(user, token))
    finally:
        client.shutdown()


def test_google_code_flow_pkce_refresh_userinfo_revoke(
    oauth_provider: OAuthProvider, dovecot: Dovecot, gmail_user: TestbedUser
) -> None:
    ends = oauth_provider.endpoints("google")
    session, query, verifier = _consent(
        oauth_provider, "google", gmail_user.address, access_type="offline", prompt="consent"
    )
    token = session.fetch_token(ends.token_url, code=query["code"][0], code_verifier=verifier)
    assert token["refresh_token"] and token["id_token"]
    info = requests.get(
        ends.userinfo_url, timeout=5, headers={"Authorization": f"Bearer {token['access_token']}"}
    ).json()
    assert info["email"] == gmail_user.address and info["email_verified"] is True
    assert _imap_login(dovecot, gmail_user.address, token["access_token"]) == [b"Logged in"]
    refreshed = session.refresh_token(ends.token_url, refresh_token=token["refresh_token"])
    assert refreshed["access_token"] != token["access_token"]
    assert ends.revoke_url is not None
    revoked = requests.post(ends.revoke_url, data={"token": token["refresh_token"]}, timeout=5)
    assert revoked.status_code == 200
    assert token["refresh_token"] in oauth_provider.revoked_tokens()
    again = requests.post(
        ends.token_url,
        timeout=5,
        auth=(session.client_id, session.client_secret),
        data={"grant_type": "refresh_token", "refresh_token": token["refresh_token"]},
    )
    assert again.status_code == 400 and again.json()["error"] == "invalid_grant"
    with pytest.raises(LoginError):
        _imap_login(dovecot, gmail_user.address, refreshed["access_token"])


def test_microsoft_offline_access_and_revoked_grant(
    oauth_provider: OAuthProvider, outlook_user: TestbedUser
) -> None:
    ends = oauth_provider.endpoints("microsoft")
    assert ends.revoke_url is None
    session, query, verifier = _consent(oauth_provider, "microsoft", outlook_user.address)
    token = session.fetch_token(ends.token_url, code=query["code"][0], code_verifier=verifier)
    rotated = session.refresh_token(ends.token_url, refresh_token=token["refresh_token"])
    assert rotated["refresh_token"] != token["refresh_token"]
    oauth_provider.revoke_grant(outlook_user.address)
    again = requests.post(
        ends.token_url,
        timeout=5,
        data={
            "grant_type": "refresh_token",
            "refresh_token": rotated["refresh_token"],
            "client_id": session.client_id,
            "client_secret": session.client_secret,
        },
    )
    assert again.json()["error"] == "invalid_grant"


def test_deny_pkce_and_transient_failures(oauth_provider: OAuthProvider) -> None:
    _session, query, _verifier = _consent(
        oauth_provider, "google", "x@example.test", decision="deny"
    )
    assert query["error"] == ["access_denied"]
    session, query, _verifier = _consent(oauth_provider, "google", "x@example.test")
    token_url = oauth_provider.endpoints("google").token_url
    assert "refresh_token" not in session.fetch_token(
        token_url, code=query["code"][0], code_verifier=_verifier
    )  # no access_type=offline
    session, query, verifier = _consent(oauth_provider, "google", "y@example.test")
    wrong = create_s256_code_challenge(verifier)  # a challenge is not the verifier
    bad = requests.post(
        token_url,
        timeout=5,
        data={
            "grant_type": "authorization_code",
            "code": query["code"][0],
            "code_verifier": wrong,
            "redirect_uri": REDIRECT_URI,
            "client_id": session.client_id,
            "client_secret": session.client_secret,
        },
    )
    assert bad.status_code == 400 and bad.json()["error"] == "invalid_grant"
    before = oauth_provider.request_count("google", "token")
    oauth_provider.fail_next_token_requests(1)
    failed = requests.post(token_url, data={"grant_type": "refresh_token"}, timeout=5)
    assert failed.status_code == 503
    assert oauth_provider.request_count("google", "token") == before + 1


def test_dovecot_rejects_expired_and_retired_tokens(
    oauth_provider: OAuthProvider, dovecot: Dovecot, gmail_user: TestbedUser
) -> None:
    good = gmail_user.mint_token()
    assert _imap_login(dovecot, gmail_user.address, good) == [b"Logged in"]
    with pytest.raises(LoginError):
        _imap_login(dovecot, gmail_user.address, gmail_user.mint_token(ttl_seconds=-5))
    oauth_provider.expire_access_tokens(gmail_user.address)
    with pytest.raises(LoginError):
        _imap_login(dovecot, gmail_user.address, good)
    assert _imap_login(dovecot, gmail_user.address, gmail_user.mint_token()) == [b"Logged in"]


def test_layouts_list_special_use(
    dovecot: Dovecot, gmail_user: TestbedUser, outlook_user: TestbedUser
) -> None:
    for user, layout in ((gmail_user, GMAIL_LAYOUT), (outlook_user, OUTLOOK_LAYOUT)):
        with dovecot.imap_session(user.address) as client:
            listed = {name: flags for flags, _sep, name in client.list_folders()}
        for folder, flag in layout:
            assert flag.encode() in listed[folder]


def test_idle_sees_lmtp_delivery(dovecot: Dovecot, imap_password_user: TestbedUser) -> None:
    assert dovecot.ports is not None and imap_password_user.password is not None
    client = IMAPClient("127.0.0.1", port=dovecot.ports.imap, ssl=False, timeout=10)
    client.starttls(dovecot.ssl_context())
    client.login(imap_password_user.address, imap_password_user.password)
    client.select_folder("INBOX")
    client.idle()
    dovecot.deliver_lmtp(imap_password_user.address, b"Subject: idle\r\n\r\nhello\r\n")
    deadline = time.monotonic() + IDLE_TIMEOUT_SECONDS
    seen: list[tuple[int, bytes]] = []
    while not seen and time.monotonic() < deadline:
        seen = [r for r in client.idle_check(timeout=0.5) if r[1] == b"EXISTS"]
    client.idle_done()
    client.logout()
    assert seen and seen[0][0] == 1


async def _send(
    server: SubmissionServer, dovecot: Dovecot, sender: TestbedUser, raw: bytes, recipient: str
) -> tuple[dict[str, aiosmtplib.SMTPResponse], str]:
    async def token() -> str:
        return sender.mint_token()

    return await aiosmtplib.send(
        raw,
        hostname="127.0.0.1",
        port=server.port,
        start_tls=True,
        tls_context=dovecot.ssl_context(),
        username=sender.address,
        oauth_token_generator=token,
        sender=sender.address,
        recipients=[recipient],
        timeout=10,
    )


async def test_submission_delivers_and_files_sent_copy(
    submission: SubmissionServer,
    dovecot: Dovecot,
    gmail_user: TestbedUser,
    outlook_user: TestbedUser,
) -> None:
    raw = (
        f"From: {gmail_user.address}\r\nTo: {outlook_user.address}\r\n"
        "Message-ID: <orig@example.test>\r\nSubject: hi\r\n\r\nbody\r\n"
    ).encode()
    _refused, reply = await _send(submission, dovecot, gmail_user, raw, outlook_user.address)
    assert reply == REPLY_QUEUED.split(" ", 1)[1]
    assert submission.transactions[-1].delivered_to == (outlook_user.address,)
    for user, folder in ((outlook_user, "INBOX"), (gmail_user, gmail_user.sent_folder)):
        with dovecot.imap_session(user.address) as client:
            client.select_folder(str(folder))
            fetched = client.fetch(client.search(), [b"RFC822"])
        assert [email.message_from_bytes(v[b"RFC822"])["Message-ID"] for v in fetched.values()] == [
            "<orig@example.test>"
        ]


async def test_exchange_rewrite_and_421_then_success(
    submission: SubmissionServer, dovecot: Dovecot, outlook_user: TestbedUser
) -> None:
    raw = b"Subject: x\r\nMessage-ID: <mine@example.test>\r\n\r\nbody\r\n"
    submission.fail_next(1, 421)
    with pytest.raises(aiosmtplib.SMTPException):
        await _send(submission, dovecot, outlook_user, raw, outlook_user.address)
    submission.rewrite_message_id = True
    _refused, reply = await _send(submission, dovecot, outlook_user, raw, outlook_user.address)
    new_id = submission.transactions[-1].message_id
    assert new_id is not None and f"<{new_id}>" in reply
    assert f"<{new_id}>".encode() in submission.transactions[-1].content
    assert submission.transactions[-1].sent_folder == "Sent Items"


def test_restart_keeps_mail_and_kick(dovecot: Dovecot, gmail_user: TestbedUser) -> None:
    uid = dovecot.append(gmail_user.address, "INBOX", b"Subject: k\r\n\r\nx\r\n", ("\\Seen",))
    assert dovecot.kick(gmail_user.address) is False
    dovecot.restart()
    with dovecot.imap_session(gmail_user.address) as client:
        client.select_folder("INBOX")
        assert client.search() == [uid]

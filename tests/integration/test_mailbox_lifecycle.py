"""Mailbox lifecycle against the local provider testbed: R19-R22 (issue 3 items 1-5).

Real HTTP to the testbed OAuth server (consent posted the way a browser
would), real IMAP LOGINs to the testbed Dovecot, SQLite in ``tmp_path``.
"""

from __future__ import annotations

import asyncio
import urllib.parse
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import requests
import sqlalchemy as sa
from cryptography.fernet import Fernet
from imapclient import IMAPClient

from gateway.config import Security, make_settings
from gateway.jobs import refresh_expiring_tokens
from gateway.mailboxes import (
    ACCESS_DENIED,
    LOGIN_FAILED,
    PROVIDER_UNAVAILABLE,
    REAUTH_REQUIRED,
    STATE_TTL_SECONDS,
    ImapServer,
    MailboxError,
    MailboxService,
)
from gateway.oauth import RetryPolicy
from ingest.types import MailboxState, Provider
from storage.db import Database
from storage.migrate import upgrade
from storage.repos.directory import add_subaccount, add_user
from storage.repos.mailboxes import STATE_CHANGED_EVENT, load_credentials
from storage.repos.oauth_states import STATE_EXPIRED, STATE_UNKNOWN, STATE_USED, StateRejected
from tests.testbed.dovecot import Dovecot
from tests.testbed.oauth_server import OAuthProvider
from tests.testbed.plugin import TestbedUser
from tests.testbed.settings import oauth_keys

pytestmark = pytest.mark.integration

PUBLIC_URL = "http://127.0.0.1:9"
WEBHOOK_URL = "http://127.0.0.1:9/hooks"
RETRY = RetryPolicy(attempts=4, initial_seconds=0.01, max_seconds=0.05)
FLAVOUR = {Provider.GMAIL: "google", Provider.OUTLOOK: "microsoft"}


@dataclass
class Env:
    """One test's gateway side: service, database, user and sub-account names."""

    service: MailboxService
    db: Database
    url: str
    user_email: str
    subaccount: str
    clients: dict[Provider, Any]


def _settings(oauth_provider: OAuthProvider, dovecot: Dovecot, clients: dict[Provider, Any]) -> Any:
    providers: dict[str, Any] = {"imap": {"ca_file": str(dovecot.ca_file)}}
    for provider, client in clients.items():
        providers[provider.value] = oauth_keys(oauth_provider, FLAVOUR[provider], client)
    return make_settings(
        security={"token_key": Fernet.generate_key().decode()},
        http={"public_url": PUBLIC_URL},
        providers=providers,
        webhooks=[{"url": WEBHOOK_URL, "secret": "s3cret", "events": [STATE_CHANGED_EVENT]}],
    )


@pytest.fixture
async def env(
    tmp_path: Path, oauth_provider: OAuthProvider, dovecot: Dovecot
) -> AsyncIterator[Env]:
    url = f"sqlite:///{tmp_path / 'mailgate.db'}"
    await asyncio.to_thread(upgrade, url)
    db = Database(url)
    redirect = (PUBLIC_URL + "/oauth/callback",)
    clients = {p: oauth_provider.register_client(f, redirect) for p, f in FLAVOUR.items()}
    settings = _settings(oauth_provider, dovecot, clients)
    service = MailboxService(db, settings, retry=RETRY)
    sub_id = await db.run(add_subaccount, "acme")
    await db.run(add_user, "crm.user@acme.test", "CRM User", [sub_id])
    yield Env(service, db, url, "crm.user@acme.test", "acme", clients)
    await db.close()


def consent(auth_url: str, login: str, decision: str = "allow") -> dict[str, str]:
    """GET the consent page, POST the form as a browser would; return the callback's query."""
    page = requests.get(auth_url, timeout=10)
    assert page.status_code == 200 and "id='allow'" in page.text
    answer = requests.post(
        auth_url,
        data={"login": login, "decision": decision},
        allow_redirects=False,
        timeout=10,
    )
    assert answer.status_code in (302, 303), answer.text
    location = answer.headers["Location"]
    assert location.startswith(PUBLIC_URL + "/oauth/callback")
    return dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(location).query))


async def connect(env: Env, provider: Provider, user: TestbedUser, purpose: str = "connect") -> Any:
    request = await env.service.start_authorization(
        env.user_email, env.subaccount, provider, purpose=purpose
    )
    query = await asyncio.to_thread(consent, request.url, user.address)
    return await env.service.finish_authorization(query["state"], code=query["code"])


def xoauth2_login(dovecot: Dovecot, address: str, token: str) -> list[Any]:
    """Log in over IMAPS with XOAUTH2 and return the folder list."""
    with IMAPClient(
        "127.0.0.1", port=dovecot.ports.imaps, ssl=True, ssl_context=dovecot.ssl_context()
    ) as client:
        client.oauth2_login(address, token)
        return list(client.list_folders())


async def raw_rows(env: Env, table: str) -> list[tuple[Any, ...]]:
    def read(session: Any) -> list[tuple[Any, ...]]:
        return [tuple(r) for r in session.execute(sa.text(f"SELECT * FROM {table}"))]  # noqa: S608

    return await env.db.read(read)


async def count(env: Env, sql: str, **params: Any) -> int:
    def read(session: Any) -> int:
        return int(session.execute(sa.text(sql), params).scalar_one())

    return await env.db.read(read)


@pytest.mark.parametrize("provider", [Provider.GMAIL, Provider.OUTLOOK])
async def test_r19_oauth_connect_end_to_end(
    env: Env, provider: Provider, dovecot: Dovecot, request: pytest.FixtureRequest
) -> None:
    user = request.getfixturevalue("gmail_user" if provider is Provider.GMAIL else "outlook_user")
    mailbox = await connect(env, provider, user)
    assert mailbox.state == MailboxState.CONNECTED
    assert mailbox.address == user.address  # vouched for by the provider
    assert mailbox.provider == provider
    token = await env.service.access_token(mailbox.id)
    folders = await asyncio.to_thread(xoauth2_login, dovecot, user.address, token)
    assert any(b"\\Sent" in flags for flags, _, _ in folders)


async def test_r19_state_single_use_and_unknown(env: Env, gmail_user: TestbedUser) -> None:
    request = await env.service.start_authorization(env.user_email, env.subaccount, Provider.GMAIL)
    query = await asyncio.to_thread(consent, request.url, gmail_user.address)
    await env.service.finish_authorization(query["state"], code=query["code"])
    with pytest.raises(StateRejected) as used:
        await env.service.finish_authorization(query["state"], code=query["code"])
    assert used.value.code == STATE_USED
    with pytest.raises(StateRejected) as unknown:
        await env.service.finish_authorization(query["state"] + "x", code=query["code"])
    assert unknown.value.code == STATE_UNKNOWN


async def test_r19_state_expires(env: Env, gmail_user: TestbedUser) -> None:
    request = await env.service.start_authorization(env.user_email, env.subaccount, Provider.GMAIL)
    query = await asyncio.to_thread(consent, request.url, gmail_user.address)
    later = datetime.now(UTC) + timedelta(seconds=STATE_TTL_SECONDS + 1)
    env.service._clock = lambda: later
    with pytest.raises(StateRejected) as expired:
        await env.service.finish_authorization(query["state"], code=query["code"])
    assert expired.value.code == STATE_EXPIRED
    assert await env.service.list() == ()


async def test_r19_state_bound_to_user_and_denied_consent(
    env: Env, gmail_user: TestbedUser
) -> None:
    with pytest.raises(Exception, match="not a member"):
        await env.service.start_authorization("stranger@acme.test", env.subaccount, Provider.GMAIL)
    request = await env.service.start_authorization(env.user_email, env.subaccount, Provider.GMAIL)
    query = await asyncio.to_thread(consent, request.url, gmail_user.address, "deny")
    with pytest.raises(MailboxError) as denied:
        await env.service.finish_authorization(query["state"], error=query["error"])
    assert denied.value.code == ACCESS_DENIED
    assert await env.service.list() == ()


def _imap_server(dovecot: Dovecot, user: TestbedUser) -> ImapServer:
    return ImapServer(
        imap_host="127.0.0.1",
        imap_port=dovecot.ports.imaps,
        imap_security=Security.TLS,
        smtp_host="127.0.0.1",
        smtp_port=587,
        smtp_security=Security.STARTTLS,
        username=user.address,
    )


async def test_r19_imap_password_connect_checks_login(
    env: Env, dovecot: Dovecot, imap_password_user: TestbedUser
) -> None:
    server = _imap_server(dovecot, imap_password_user)
    with pytest.raises(MailboxError) as refused:
        await env.service.connect_imap(env.user_email, env.subaccount, server, "wrong-password")
    assert refused.value.code == LOGIN_FAILED
    assert await env.service.list() == ()
    assert imap_password_user.password is not None
    mailbox = await env.service.connect_imap(
        env.user_email, env.subaccount, server, imap_password_user.password
    )
    assert (mailbox.state, mailbox.provider) == (MailboxState.CONNECTED, Provider.IMAP)
    assert mailbox.server_settings is not None and "password" not in mailbox.server_settings
    creds = await env.service.password_credentials(mailbox.id)
    assert creds == (imap_password_user.address, imap_password_user.password)


async def test_r22_job_refreshes_ahead_of_expiry(
    env: Env, oauth_provider: OAuthProvider, dovecot: Dovecot, gmail_user: TestbedUser
) -> None:
    mailbox = await connect(env, Provider.GMAIL, gmail_user)
    first = await env.service.access_token(mailbox.id)
    assert mailbox.token_expires_at is not None
    now_calls = oauth_provider.request_count("google", "token")
    early = await refresh_expiring_tokens(env.service, clock=lambda: datetime.now(UTC))
    assert mailbox.id not in early.refreshed  # an hour left: not due yet
    near_expiry = mailbox.token_expires_at - timedelta(seconds=60)
    report = await refresh_expiring_tokens(env.service, clock=lambda: near_expiry)
    assert report.refreshed == (mailbox.id,)
    assert oauth_provider.request_count("google", "token") == now_calls + 1
    second = await env.service.access_token(mailbox.id)
    assert second != first
    assert (await env.service.get(mailbox.id)).state == MailboxState.CONNECTED
    await asyncio.to_thread(xoauth2_login, dovecot, gmail_user.address, second)


async def test_r22_invalid_grant_then_reconnect_same_row(
    env: Env, oauth_provider: OAuthProvider, gmail_user: TestbedUser
) -> None:
    mailbox = await connect(env, Provider.GMAIL, gmail_user)
    stopped: list[Any] = []

    async def on_change(change: Any) -> None:
        stopped.append(change)

    env.service.add_listener(on_change)
    oauth_provider.revoke_grant(gmail_user.address)
    with pytest.raises(MailboxError) as reauth:
        await env.service.access_token(mailbox.id, force_refresh=True)
    assert reauth.value.code == REAUTH_REQUIRED
    after = await env.service.get(mailbox.id)
    assert after.state == MailboxState.REAUTH_REQUIRED and not after.has_credentials
    assert [c.state for c in stopped] == [MailboxState.REAUTH_REQUIRED]
    sql = "SELECT count(*) FROM sync_log WHERE mailbox_id = :m AND rule = 'R22'"
    assert await count(env, sql, m=mailbox.id) == 1
    events = await env.db.read(
        lambda s: [
            r.payload
            for r in s.execute(sa.text("SELECT payload FROM webhook_deliveries")).mappings()
        ]
    )
    assert any(MailboxState.REAUTH_REQUIRED.value in str(p) for p in events)
    again = await connect(env, Provider.GMAIL, gmail_user)
    assert again.id == mailbox.id and again.state == MailboxState.CONNECTED
    assert await env.service.access_token(again.id)


async def test_r22_transient_token_errors_retried_without_state_change(
    env: Env, oauth_provider: OAuthProvider, outlook_user: TestbedUser
) -> None:
    mailbox = await connect(env, Provider.OUTLOOK, outlook_user)
    before = oauth_provider.request_count("microsoft", "token")
    oauth_provider.fail_next_token_requests(2, status=503)
    token = await env.service.access_token(mailbox.id, force_refresh=True)
    assert token
    assert oauth_provider.request_count("microsoft", "token") == before + 3
    assert (await env.service.get(mailbox.id)).state == MailboxState.CONNECTED
    # Exactly RETRY.attempts failures, so none is left for the next test.
    oauth_provider.fail_next_token_requests(
        RETRY.attempts, status=503, content_type="text/html", body="<h1>busy</h1>"
    )
    with pytest.raises(MailboxError) as unavailable:
        await env.service.access_token(mailbox.id, force_refresh=True)
    assert unavailable.value.code == PROVIDER_UNAVAILABLE
    assert (await env.service.get(mailbox.id)).state == MailboxState.CONNECTED


async def test_r20_update_email_swaps_in_one_transaction(
    env: Env, gmail_user: TestbedUser, outlook_user: TestbedUser
) -> None:
    old = await connect(env, Provider.GMAIL, gmail_user)
    request = await env.service.start_authorization(
        env.user_email, env.subaccount, Provider.OUTLOOK, purpose="update"
    )
    denied = await asyncio.to_thread(consent, request.url, outlook_user.address, "deny")
    with pytest.raises(MailboxError):
        await env.service.finish_authorization(denied["state"], error=denied["error"])
    assert (await env.service.get(old.id)).state == MailboxState.CONNECTED  # still active
    new = await connect(env, Provider.OUTLOOK, outlook_user, purpose="update")
    old_after = await env.service.get(old.id)
    assert new.state == MailboxState.CONNECTED and new.address == outlook_user.address
    assert old_after.state == MailboxState.DISCONNECTED and not old_after.has_credentials
    assert old_after.replaced_by_mailbox_id == new.id
    assert old_after.disconnected_at == new.connected_at  # same transaction, same instant
    current = await env.service.current(env.user_email, env.subaccount)
    assert current is not None and current.id == new.id


async def test_r21_disconnect_revokes_and_deletes_tokens(
    env: Env, oauth_provider: OAuthProvider, gmail_user: TestbedUser
) -> None:
    mailbox = await connect(env, Provider.GMAIL, gmail_user)
    revoked_before = len(oauth_provider.revoked_tokens())
    done = await env.service.disconnect(mailbox.id)
    assert done.state == MailboxState.DISCONNECTED and not done.has_credentials
    assert len(oauth_provider.revoked_tokens()) == revoked_before + 1
    sql = "SELECT count(*) FROM mailboxes WHERE id = :m AND credentials_ciphertext IS NULL"
    assert await count(env, sql, m=mailbox.id) == 1
    sql = "SELECT count(*) FROM sync_log WHERE mailbox_id = :m AND rule = 'R21'"
    assert await count(env, sql, m=mailbox.id) == 1
    with pytest.raises(MailboxError):
        await env.service.access_token(mailbox.id)


async def test_r21_outlook_disconnect_without_revocation_endpoint(
    env: Env, oauth_provider: OAuthProvider, outlook_user: TestbedUser
) -> None:
    mailbox = await connect(env, Provider.OUTLOOK, outlook_user)
    done = await env.service.disconnect(mailbox.id)
    assert done.state == MailboxState.DISCONNECTED and not done.has_credentials
    assert oauth_provider.request_count("microsoft", "revoke") == 0


async def test_r19_raw_tables_hold_no_secret_in_clear(
    env: Env, dovecot: Dovecot, gmail_user: TestbedUser, imap_password_user: TestbedUser
) -> None:
    mailbox = await connect(env, Provider.GMAIL, gmail_user)
    token = await env.service.access_token(mailbox.id)
    pending = await env.service.start_authorization(env.user_email, env.subaccount, Provider.GMAIL)
    assert imap_password_user.password is not None
    other_sub = await env.db.run(add_subaccount, "other")
    await env.db.run(add_user, env.user_email, "CRM User", [other_sub])
    await env.service.connect_imap(
        env.user_email,
        "other",
        _imap_server(dovecot, imap_password_user),
        imap_password_user.password,
    )
    secrets_in_clear = [token, imap_password_user.password, pending.state]
    _, ciphertext = await env.db.read(load_credentials, mailbox.id)
    assert ciphertext is not None
    refresh = env.service.cipher.decrypt_json(ciphertext)["refresh_token"]
    secrets_in_clear.append(refresh)
    dump = ""
    for table in ("mailboxes", "oauth_states", "sync_log", "webhook_deliveries"):
        for row in await raw_rows(env, table):
            for value in row:
                if isinstance(value, bytes):
                    dump += value.decode("latin-1") + "\n"
                else:
                    dump += str(value) + "\n"
    assert dump
    for secret in secrets_in_clear:
        assert secret and secret not in dump

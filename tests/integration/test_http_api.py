"""The HTTP API end to end: uvicorn + Starlette app, SQLite in tmp_path, testbed OAuth (R19-R21).

Real HTTP everywhere: requests → our server; the consent form is POSTed to
the testbed OAuth server the way a browser would; its redirect is followed
to our ``/oauth/callback``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import requests

from gateway.http.api_mailbox import MAILBOX_NOT_FOUND
from gateway.http.errors import FORBIDDEN, UNAUTHENTICATED, VALIDATION_FAILED
from gateway.http.schemas import UNSUPPORTED_MEDIA_TYPE
from gateway.mailboxes import ACCESS_DENIED, CALLBACK_PATH, NOT_CONNECTED
from ingest.types import MailboxState, Provider
from storage.db import Database
from storage.repos.mailboxes import record_sync
from storage.repos.oauth_states import STATE_USED
from tests.integration.http_gateway import Gateway, callback_query, consent, start_gateway
from tests.testbed.oauth_server import OAuthProvider
from tests.testbed.plugin import TestbedUser

pytestmark = pytest.mark.integration

JSON = {"Accept": "application/json"}


@pytest.fixture
def gw(tmp_path: Path, oauth_provider: OAuthProvider) -> Iterator[Gateway]:
    with start_gateway(tmp_path, oauth_provider) as gateway:
        yield gateway


def mailbox_url(gw: Gateway, action: str = "") -> str:
    return f"{gw.url}/api/v1/users/{gw.seeded.user_id}/mailbox{action}"


def assert_error(response: requests.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body["error"]) == {"code", "message", "details"}
    assert body["error"]["code"] == code, body
    assert body["error"]["message"]
    return dict(body["error"])


def connect_via_api(
    gw: Gateway, provider: Provider, user: TestbedUser, action: str = "/connect"
) -> tuple[requests.Response, dict[str, str]]:
    started = gw.api().post(
        mailbox_url(gw, action), params={"provider": provider.value, "subaccount": "acme"}
    )
    assert started.status_code == 200, started.text
    location = consent(started.json()["authorization_url"], user.address)
    assert location.startswith(gw.url + CALLBACK_PATH)
    return gw.api().get(location), callback_query(location)


def test_probes_and_openapi(gw: Gateway) -> None:
    assert requests.get(gw.url + "/healthz", timeout=5).json() == {"status": "ok"}
    assert requests.get(gw.url + "/readyz", timeout=5).status_code == 200
    assert requests.get(gw.url + "/metrics", timeout=5).status_code == 200
    doc = requests.get(gw.url + "/openapi.json", timeout=5).json()
    assert doc["openapi"].startswith("3.1")
    for path in (
        "/api/v1/users/{user_id}/mailbox",
        "/api/v1/users/{user_id}/mailbox/connect",
        "/api/v1/users/{user_id}/mailbox/update",
        "/api/v1/users/{user_id}/mailbox/disconnect",
        "/api/v1/users/{user_id}/bcc-address",
        "/api/v1/contacts",
        "/api/v1/subaccounts",
        "/api/v1/users",
        CALLBACK_PATH,
    ):
        assert path in doc["paths"], path
    refs = doc["paths"]["/api/v1/contacts"]["post"]["requestBody"]["content"]["application/json"]
    assert (
        refs["schema"]["$ref"].removeprefix("#/components/schemas/") in doc["components"]["schemas"]
    )
    assert_error(requests.get(gw.url + "/nope", timeout=5), 404, "not_found")


def test_api_keys_401_without_or_unknown_key_and_403_out_of_scope(gw: Gateway) -> None:
    bare = requests.get(gw.url + "/api/v1/subaccounts", headers=JSON, timeout=5)
    assert_error(bare, 401, UNAUTHENTICATED)
    assert bare.headers["WWW-Authenticate"].startswith("Bearer")
    assert_error(gw.api("not-a-key").get(gw.url + "/api/v1/subaccounts"), 401, UNAUTHENTICATED)
    scoped = gw.api(gw.acme_key)
    names = [s["name"] for s in scoped.get(gw.url + "/api/v1/subaccounts").json()["subaccounts"]]
    assert names == ["acme"]
    every = gw.api().get(gw.url + "/api/v1/subaccounts").json()["subaccounts"]
    assert [s["name"] for s in every] == ["acme", "globex"]
    other = f"{gw.url}/api/v1/users/{gw.seeded.other_user_id}"
    assert_error(scoped.get(other + "/mailbox", params={"subaccount": "globex"}), 403, FORBIDDEN)
    assert_error(scoped.get(other), 403, FORBIDDEN)
    assert_error(scoped.post(gw.url + "/api/v1/subaccounts", json={"name": "x"}), 403, FORBIDDEN)
    assert scoped.get(mailbox_url(gw), params={"subaccount": "acme"}).status_code == 404


def test_r19_connect_via_api_then_callback_json(gw: Gateway, gmail_user: TestbedUser) -> None:
    none = gw.api().get(mailbox_url(gw), params={"subaccount": "acme"})
    assert_error(none, 404, MAILBOX_NOT_FOUND)
    finished, query = connect_via_api(gw, Provider.GMAIL, gmail_user)
    assert finished.status_code == 200, finished.text
    assert finished.json()["mailbox"]["address"] == gmail_user.address
    shown = gw.api().get(mailbox_url(gw), params={"subaccount": "acme"}).json()
    assert shown["state"] == MailboxState.CONNECTED.value
    assert shown["address"] == gmail_user.address  # vouched for by the provider
    assert shown["provider"] == Provider.GMAIL.value
    assert {"last_sync_at", "last_error"} <= set(shown)
    assert shown["sync_lag_seconds"] is None  # no IMAP watcher here: nothing synced yet
    assert not {"credentials_ciphertext", "access_token", "refresh_token"} & set(shown)
    replay = gw.api().get(gw.url + CALLBACK_PATH, params=query)
    assert_error(replay, 400, STATE_USED)
    synced_at = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
    asyncio.run(record_sync_of(gw, shown["id"], at=synced_at, lag_seconds=12.5))
    shown = gw.api().get(mailbox_url(gw), params={"subaccount": "acme"}).json()
    assert shown["sync_lag_seconds"] == 12.5
    assert datetime.fromisoformat(shown["last_sync_at"]) == synced_at


async def record_sync_of(gw: Gateway, mailbox_id: int, *, at: datetime, lag_seconds: float) -> None:
    """What the IMAP watcher writes after a committed batch (no watcher runs in this gateway)."""
    db = Database(gw.settings.storage.database_url)
    try:
        await db.run(record_sync, mailbox_id, at=at, lag_seconds=lag_seconds)
    finally:
        await db.close()


def test_r19_browser_callback_redirects_to_settings(gw: Gateway, outlook_user: TestbedUser) -> None:
    started = gw.api().post(
        mailbox_url(gw, "/connect"), params={"provider": "outlook", "subaccount": "acme"}
    )
    location = consent(started.json()["authorization_url"], outlook_user.address)
    browser = requests.get(
        location, headers={"Accept": "text/html"}, allow_redirects=False, timeout=5
    )
    assert browser.status_code == 303 and browser.headers["Location"] == "/settings/email"
    shown = gw.api().get(mailbox_url(gw), params={"subaccount": "acme"}).json()
    assert (shown["state"], shown["provider"]) == ("connected", Provider.OUTLOOK.value)


def test_r19_denied_consent_and_bad_provider(gw: Gateway, gmail_user: TestbedUser) -> None:
    started = gw.api().post(
        mailbox_url(gw, "/connect"), params={"provider": "gmail", "subaccount": "acme"}
    )
    location = consent(started.json()["authorization_url"], gmail_user.address, "deny")
    assert_error(gw.api().get(location), 400, ACCESS_DENIED)
    assert gw.api().get(mailbox_url(gw), params={"subaccount": "acme"}).status_code == 404
    bad = gw.api().post(mailbox_url(gw, "/connect"), params={"provider": "aol", "subaccount": "1"})
    assert_error(bad, 400, "bad_request")
    missing = gw.api().post(mailbox_url(gw, "/connect"), params={"provider": "gmail"})
    assert_error(missing, 400, "bad_request")


def test_r20_update_email_swaps_the_mailbox(
    gw: Gateway, gmail_user: TestbedUser, dovecot: object
) -> None:
    from tests.testbed.plugin import make_user

    assert_error(
        gw.api().post(mailbox_url(gw, "/update"), params={"subaccount": "acme"}),
        503,
        NOT_CONNECTED,
    )
    first, _ = connect_via_api(gw, Provider.GMAIL, gmail_user)
    second_user = make_user(dovecot, gmail_user.keys, "gmail")  # type: ignore[arg-type]
    second, _ = connect_via_api(gw, Provider.GMAIL, second_user, action="/update")
    assert second.status_code == 200, second.text
    assert second.json()["mailbox"]["id"] != first.json()["mailbox"]["id"]
    shown = gw.api().get(mailbox_url(gw), params={"subaccount": "acme"}).json()
    assert (shown["address"], shown["state"]) == (second_user.address, "connected")


def test_r21_disconnect_keeps_record_and_is_503_when_not_connected(
    gw: Gateway, gmail_user: TestbedUser
) -> None:
    assert_error(
        gw.api().post(mailbox_url(gw, "/disconnect"), params={"subaccount": "acme"}),
        503,
        NOT_CONNECTED,
    )
    connect_via_api(gw, Provider.GMAIL, gmail_user)
    gone = gw.api().post(mailbox_url(gw, "/disconnect"), params={"subaccount": "acme"})
    assert gone.status_code == 200 and gone.json()["state"] == MailboxState.DISCONNECTED.value
    shown = gw.api().get(mailbox_url(gw), params={"subaccount": "acme"}).json()
    assert (shown["state"], shown["address"]) == ("disconnected", gmail_user.address)
    again = gw.api().post(mailbox_url(gw, "/disconnect"), params={"subaccount": "acme"})
    assert_error(again, 503, NOT_CONNECTED)


def test_r14_bcc_address_matches_user_membership(gw: Gateway) -> None:
    answer = gw.api().get(
        f"{gw.url}/api/v1/users/{gw.seeded.user_id}/bcc-address", params={"subaccount": "acme"}
    )
    assert answer.status_code == 200
    address = answer.json()["address"]
    assert address.endswith("@" + gw.settings.bcc.domain)
    user = gw.api().get(f"{gw.url}/api/v1/users/{gw.seeded.user_id}").json()
    assert [m["sync_address"] for m in user["subaccounts"]] == [address]
    stranger = gw.api().get(
        f"{gw.url}/api/v1/users/{gw.seeded.other_user_id}/bcc-address",
        params={"subaccount": "acme"},
    )
    assert_error(stranger, 404, "not_found")


def test_r10_contacts_create_list_conflict_and_validation(gw: Gateway) -> None:
    api, url = gw.api(), gw.url + "/api/v1/contacts"
    made = api.post(
        url,
        json={
            "subaccount": "acme",
            "email": "Pat@Client.test",
            "name": "Pat",
            "assigned_user_email": gw.seeded.user_email,
        },
    )
    assert made.status_code == 201, made.text
    contact = made.json()
    assert (contact["email"], contact["assigned_user_email"]) == (
        "Pat@Client.test",
        gw.seeded.user_email,
    )
    assert api.get(f"{url}/{contact['id']}").json() == contact
    dup = api.post(url, json={"subaccount": "acme", "email": "pat@client.test"})
    assert_error(dup, 409, "conflict")
    listed = api.get(url, params={"subaccount": "acme"}).json()["contacts"]
    assert [c["id"] for c in listed] == [contact["id"]]
    renamed = api.patch(f"{url}/{contact['id']}", json={"name": "Patricia"})
    assert renamed.json()["name"] == "Patricia"
    extra = assert_error(
        api.post(url, json={"subaccount": "acme", "email": "a@b.test", "x": 1}),
        422,
        VALIDATION_FAILED,
    )
    assert any(e["loc"] == ["x"] for e in extra["details"]["errors"])
    assert_error(
        api.post(url, json={"subaccount": "acme", "email": "no at all"}), 422, VALIDATION_FAILED
    )
    assert_error(
        api.post(url, data="{", headers={"Content-Type": "application/json"}),
        400,
        "malformed_json",
    )
    assert_error(api.get(f"{url}/{2**64}"), 404, "not_found")
    assert_error(
        api.post(url, data="a=b", headers={"Content-Type": "text/plain"}),
        415,
        UNSUPPORTED_MEDIA_TYPE,
    )
    assert_error(api.get(url), 400, "bad_request")
    scoped = gw.api(gw.acme_key).post(url, json={"subaccount": "globex", "email": "z@z.test"})
    assert_error(scoped, 403, FORBIDDEN)


def test_subaccounts_and_users_create_read_update(gw: Gateway) -> None:
    api = gw.api()
    sub = api.post(gw.url + "/api/v1/subaccounts", json={"name": "initech"})
    assert sub.status_code == 201 and sub.json()["name"] == "initech"
    assert_error(
        api.post(gw.url + "/api/v1/subaccounts", json={"name": "initech"}), 409, "conflict"
    )
    assert api.get(f"{gw.url}/api/v1/subaccounts/{sub.json()['id']}").json()["name"] == "initech"
    user = api.post(
        gw.url + "/api/v1/users",
        json={
            "email": "new@initech.test",
            "name": "New",
            "subaccounts": ["initech", gw.seeded.acme_id],
        },
    )
    assert user.status_code == 201, user.text
    assert [m["subaccount_name"] for m in user.json()["subaccounts"]] == ["acme", "initech"]
    renamed = api.patch(f"{gw.url}/api/v1/users/{user.json()['id']}", json={"name": "Renamed"})
    assert renamed.json()["name"] == "Renamed"
    members = api.get(gw.url + "/api/v1/users", params={"subaccount": "initech"}).json()["users"]
    assert [m["email"] for m in members] == ["new@initech.test"]
    assert_error(api.get(gw.url + "/api/v1/users/999999"), 404, "not_found")
    assert_error(
        api.post(
            gw.url + "/api/v1/users", json={"email": "a@b.test", "name": "A", "subaccounts": []}
        ),
        422,
        VALIDATION_FAILED,
    )


def test_settings_page_needs_sign_in_and_csrf(gw: Gateway) -> None:
    from gateway.http.errors import CSRF_FAILED
    from gateway.http.pages import DISCONNECT_PATH, SETTINGS_PATH, STATE_NOT_CONNECTED
    from gateway.http.signin import LOGIN_PATH, SignIn, login_url

    anonymous = requests.get(gw.url + SETTINGS_PATH, timeout=5)
    assert anonymous.status_code == 401 and "sign-in link" in anonymous.text
    forged = requests.get(gw.url + LOGIN_PATH, params={"token": "x.y.z"}, timeout=5)
    assert forged.status_code == 401
    browser = requests.Session()
    link = login_url(
        gw.settings, SignIn(user_id=gw.seeded.user_id, subaccount_id=gw.seeded.acme_id)
    )
    page = browser.get(link, timeout=5)
    assert page.url == gw.url + SETTINGS_PATH and STATE_NOT_CONNECTED in page.text
    assert "script-src 'nonce-" in page.headers["Content-Security-Policy"]
    stale = browser.post(gw.url + DISCONNECT_PATH, data={"csrf": "wrong"}, allow_redirects=False)
    assert stale.status_code == 403 and CSRF_FAILED not in stale.text
    assert "reload the page" in stale.text
    cross = requests.post(gw.url + DISCONNECT_PATH, data={}, allow_redirects=False, timeout=5)
    assert cross.status_code == 401

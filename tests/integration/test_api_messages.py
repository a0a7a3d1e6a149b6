"""``POST /api/v1/messages`` end to end (issue 5): R1, R17, R21, idempotency, scope, bodies.

Real HTTP (uvicorn in a thread, as ``http_gateway.py`` does) in front of a
real ``OutboundService``, SQLite in ``tmp_path``, and the testbed: OAuth2
server, Dovecot, the provider-like submission server. Mailboxes are
connected through the API and the testbed consent form; contacts are
created through the API.
"""

from __future__ import annotations

import asyncio
import base64
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import requests
import uvicorn
from cryptography.fernet import Fernet

from gateway.config import Settings, make_settings
from gateway.http.api_messages import (
    IDEMPOTENCY_HEADER,
    IDEMPOTENCY_KEY_REUSED,
    MALFORMED_JSON,
    MESSAGES_PATH,
)
from gateway.http.app import build_http_app
from gateway.http.auth import ApiKeys
from gateway.http.context import HttpContext
from gateway.http.errors import FORBIDDEN, SEND_STATUS, VALIDATION_FAILED
from gateway.mailboxes import CALLBACK_PATH, MailboxService
from gateway.oauth import RetryPolicy
from gateway.observability import Metrics
from gateway.outbound import CONTACT_NOT_FOUND, MAILBOX_NOT_CONNECTED, OutboundService
from ingest.limits import QUOTA_WINDOW, LimitCode
from ingest.types import Provider
from storage.blobs import BlobStore
from storage.db import Database
from storage.migrate import upgrade
from storage.models.enums import OutboundState
from tests.integration.http_gateway import consent
from tests.integration.send_env import FLAVOUR, SUBACCOUNT, USER_EMAIL, provider_settings
from tests.integration.test_send_mailbox import inbox_message_ids, sent_for
from tests.testbed.dovecot import Dovecot
from tests.testbed.oauth_server import OAuthProvider
from tests.testbed.plugin import TestbedUser
from tests.testbed.submission import SubmissionServer

pytestmark = pytest.mark.integration

RETRY = RetryPolicy(attempts=2, initial_seconds=0.01, max_seconds=0.05)
START_TIMEOUT_SECONDS = 10.0
SETTLE_TIMEOUT_SECONDS = 20.0
OTHER_SUBACCOUNT = "globex"
OTHER_USER = "other@globex.test"


@dataclass(frozen=True, slots=True, kw_only=True)
class SendGateway:
    """A running gateway with an ``OutboundService``; ``acme_key`` may use only ``acme``."""

    url: str
    all_key: str
    acme_key: str
    user_id: int

    def post(self, body: Any, *, key: str | None = None, **headers: str) -> requests.Response:
        auth = {"Authorization": f"Bearer {key or self.all_key}", **headers}
        return requests.post(self.url + MESSAGES_PATH, json=body, headers=auth, timeout=30)

    def get(self, path: str, *, key: str | None = None) -> requests.Response:
        auth = {"Authorization": f"Bearer {key or self.all_key}"}
        return requests.get(self.url + path, headers=auth, timeout=30)


def _settings(
    tmp_path: Path, url: str, testbed: tuple[OAuthProvider, Dovecot, SubmissionServer], **kw: Any
) -> tuple[Settings, tuple[str, str]]:
    oauth_provider, dovecot, submission = testbed
    redirect = (url + CALLBACK_PATH,)
    clients = {p: oauth_provider.register_client(f, redirect) for p, f in FLAVOUR.items()}
    keys = (secrets.token_urlsafe(24), secrets.token_urlsafe(24))
    settings = make_settings(
        storage={
            "database_url": f"sqlite+aiosqlite:///{tmp_path / 'mailgate.db'}",
            "data_dir": str(tmp_path / "data"),
        },
        security={"token_key": Fernet.generate_key().decode()},
        http={
            "public_url": url,
            "api_keys": [
                {"name": "crm", "key": keys[0]},
                {"name": "acme-only", "key": keys[1], "subaccounts": [SUBACCOUNT]},
            ],
        },
        providers=provider_settings(
            oauth_provider, dovecot, submission, clients, kw.get("limits", {})
        ),
    )
    return settings, keys


def _serve(settings: Settings, sock: socket.socket, box: dict[str, Any]) -> None:
    async def main() -> None:
        db = Database(settings.storage.database_url)
        mailboxes = MailboxService(db, settings, retry=RETRY)
        blobs = BlobStore(Path(settings.storage.data_dir) / "blobs")
        context = HttpContext(
            db=db,
            settings=settings,
            service=mailboxes,
            keys=ApiKeys(settings.http.api_keys),
            outbound=OutboundService(db, settings, mailboxes, blobs),
        )
        app = build_http_app(metrics=Metrics(), ready_check=_ready, context=context)
        config = uvicorn.Config(
            app, lifespan="off", log_config=None, access_log=False, ws="none", http="h11"
        )
        box["server"] = server = uvicorn.Server(config)
        try:
            await server.serve(sockets=[sock])
        finally:
            await db.close()

    asyncio.run(main())


async def _ready() -> tuple[bool, str]:
    return True, ""


def _seed(gw: SendGateway) -> int:
    for name in (SUBACCOUNT, OTHER_SUBACCOUNT):
        api_ok(requests.post, gw, "/api/v1/subaccounts", {"name": name})
    api_ok(
        requests.post,
        gw,
        "/api/v1/users",
        {"email": OTHER_USER, "name": "Other", "subaccounts": [OTHER_SUBACCOUNT]},
    )
    user = api_ok(
        requests.post,
        gw,
        "/api/v1/users",
        {"email": USER_EMAIL, "name": "CRM User", "subaccounts": [SUBACCOUNT]},
    )
    return int(user["id"])


def api_ok(method: Any, gw: SendGateway, path: str, body: Any = None, **kw: Any) -> Any:
    answer = method(
        gw.url + path,
        json=body,
        headers={"Authorization": f"Bearer {gw.all_key}", "Accept": "application/json"},
        timeout=30,
        **kw,
    )
    assert answer.status_code < 300, answer.text
    return answer.json()


@contextmanager
def start_send_gateway(
    tmp_path: Path, testbed: tuple[OAuthProvider, Dovecot, SubmissionServer], **kw: Any
) -> Iterator[SendGateway]:
    """Run a gateway with an ``OutboundService`` on a free loopback port until the exit."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    settings, keys = _settings(tmp_path, url, testbed, **kw)
    upgrade(settings.storage.database_url)
    box: dict[str, Any] = {}
    thread = threading.Thread(target=_serve, args=(settings, sock, box), name="send-gateway")
    thread.start()
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while not (box.get("server") and box["server"].started):
        assert thread.is_alive() and time.monotonic() < deadline, "gateway did not start"
        time.sleep(0.02)
    try:
        gw = SendGateway(url=url, all_key=keys[0], acme_key=keys[1], user_id=0)
        yield SendGateway(url=url, all_key=keys[0], acme_key=keys[1], user_id=_seed(gw))
    finally:
        box["server"].should_exit = True
        thread.join(timeout=START_TIMEOUT_SECONDS)
        sock.close()


@pytest.fixture
def testbed(
    oauth_provider: OAuthProvider, dovecot: Dovecot, submission: SubmissionServer
) -> tuple[OAuthProvider, Dovecot, SubmissionServer]:
    return oauth_provider, dovecot, submission


@pytest.fixture
def gw(
    tmp_path: Path, testbed: tuple[OAuthProvider, Dovecot, SubmissionServer]
) -> Iterator[SendGateway]:
    with start_send_gateway(tmp_path, testbed) as gateway:
        yield gateway


def connect(gw: SendGateway, provider: Provider, user: TestbedUser) -> None:
    """Connect ``user``'s mailbox through the API and the testbed consent form (R19)."""
    path = f"/api/v1/users/{gw.user_id}/mailbox/connect"
    params = {"provider": provider.value, "subaccount": SUBACCOUNT}
    started = api_ok(requests.post, gw, path, params=params)
    location = consent(started["authorization_url"], user.address)
    mailbox = requests.get(location, headers={"Accept": "application/json"}, timeout=30)
    assert mailbox.status_code == 200, mailbox.text


def add_contact(gw: SendGateway, contact: TestbedUser, subaccount: str = SUBACCOUNT) -> None:
    body = {"subaccount": subaccount, "email": contact.address, "name": "Bob Contact"}
    api_ok(requests.post, gw, "/api/v1/contacts", body)


def message(contact: TestbedUser, **kw: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "user": USER_EMAIL,
        "subaccount": SUBACCOUNT,
        "to": [contact.address],
        "subject": "Your quote",
        "text": "Hello from the CRM",
    }
    body.update(kw)
    return body


def settled(gw: SendGateway, outbound_id: int) -> dict[str, Any]:
    """Poll ``GET /api/v1/messages/{id}`` until the send is ``sent`` or ``failed``."""
    deadline = time.monotonic() + SETTLE_TIMEOUT_SECONDS
    while True:
        row = gw.get(f"{MESSAGES_PATH}/{outbound_id}")
        assert row.status_code == 200, row.text
        doc: dict[str, Any] = row.json()
        if doc["state"] in (OutboundState.SENT, OutboundState.FAILED):
            return doc
        assert time.monotonic() < deadline, doc
        time.sleep(0.05)


def assert_error(answer: requests.Response, code: str, status: int | None = None) -> Any:
    assert answer.status_code == (status or SEND_STATUS[code]), answer.text
    error = answer.json()["error"]
    assert error["code"] == code and error["message"]
    return error


def test_r1_api_send_through_gmail_mailbox_reaches_inbox(
    gw: SendGateway,
    dovecot: Dovecot,
    submission: SubmissionServer,
    gmail_user: TestbedUser,
    imap_password_user: TestbedUser,
) -> None:
    connect(gw, Provider.GMAIL, gmail_user)
    add_contact(gw, imap_password_user)
    answer = gw.post(message(imap_password_user))
    assert answer.status_code == 202, answer.text
    body = answer.json()
    assert set(body) == {"id", "message_id", "state"}
    assert body["state"] in (OutboundState.QUEUED, OutboundState.SENDING, OutboundState.SENT)
    assert answer.headers["Location"] == f"{MESSAGES_PATH}/{body['id']}"
    row = settled(gw, body["id"])
    assert row["state"] == OutboundState.SENT, row
    assert row["message_id"] == body["message_id"] and row["route"] == "mailbox"
    (tx,) = sent_for(submission, body["message_id"])
    assert tx.auth_user == gmail_user.address
    expected = f"<{body['message_id']}>".encode()
    assert any(expected in h for h in inbox_message_ids(dovecot, imap_password_user))


def test_idempotency_key_returns_same_message_and_sends_once(
    gw: SendGateway,
    submission: SubmissionServer,
    gmail_user: TestbedUser,
    imap_password_user: TestbedUser,
) -> None:
    connect(gw, Provider.GMAIL, gmail_user)
    add_contact(gw, imap_password_user)
    key = {IDEMPOTENCY_HEADER: "order-1234"}
    first = gw.post(message(imap_password_user), **key)
    again_at_once = gw.post(message(imap_password_user), **key)
    assert first.status_code == 202, first.text
    assert again_at_once.status_code == 200, again_at_once.text
    assert settled(gw, first.json()["id"])["state"] == OutboundState.SENT
    again = gw.post(message(imap_password_user), **key)
    assert again.status_code == 200
    same = ("id", "message_id")
    for replay in (again_at_once.json(), again.json()):
        assert [replay[k] for k in same] == [first.json()[k] for k in same]
    assert again.json()["state"] == OutboundState.SENT
    assert len(sent_for(submission, first.json()["message_id"])) == 1
    other = message(imap_password_user, user=OTHER_USER, subaccount=OTHER_SUBACCOUNT)
    assert_error(gw.post(other, **key), IDEMPOTENCY_KEY_REUSED, 409)


def test_r17_quota_exhausted_429_with_retry_after(
    tmp_path: Path,
    testbed: tuple[OAuthProvider, Dovecot, SubmissionServer],
    submission: SubmissionServer,
    gmail_user: TestbedUser,
    imap_password_user: TestbedUser,
) -> None:
    limits = {"gmail": {"daily_send_limit": 1}}
    with start_send_gateway(tmp_path, testbed, limits=limits) as gw:
        connect(gw, Provider.GMAIL, gmail_user)
        add_contact(gw, imap_password_user)
        first = gw.post(message(imap_password_user))
        assert first.status_code == 202, first.text
        assert settled(gw, first.json()["id"])["state"] == OutboundState.SENT
        refused = gw.post(message(imap_password_user))
        error = assert_error(refused, LimitCode.QUOTA_EXCEEDED)
        retry_after = int(refused.headers["Retry-After"])
        window = int(QUOTA_WINDOW.total_seconds())
        assert window - 120 < retry_after <= window
        resets_at = datetime.fromisoformat(error["details"]["resets_at"])
        kept = settled(gw, error["details"]["id"])  # the refusal is kept as a failed row
        assert kept["state"] == OutboundState.FAILED and kept["error"] == LimitCode.QUOTA_EXCEEDED
        assert datetime.fromisoformat(kept["resets_at"]) == resets_at
        assert sent_for(submission, error["details"]["message_id"]) == []


def test_r17_outlook_attachment_type_refused_415(
    gw: SendGateway,
    submission: SubmissionServer,
    outlook_user: TestbedUser,
    imap_password_user: TestbedUser,
) -> None:
    connect(gw, Provider.OUTLOOK, outlook_user)
    add_contact(gw, imap_password_user)
    exe = {
        "filename": "tool.exe",
        "content_type": "application/x-msdownload",
        "content_base64": base64.b64encode(b"MZ").decode(),
    }
    error = assert_error(
        gw.post(message(imap_password_user, attachments=[exe])),
        LimitCode.ATTACHMENT_TYPE_NOT_ALLOWED,
    )
    assert SEND_STATUS[LimitCode.ATTACHMENT_TYPE_NOT_ALLOWED] == 415
    kept = settled(gw, error["details"]["id"])
    assert kept["error"] == LimitCode.ATTACHMENT_TYPE_NOT_ALLOWED
    assert sent_for(submission, kept["message_id"]) == []


def test_r21_no_mailbox_no_relay_503_kept_failed(
    gw: SendGateway, imap_password_user: TestbedUser
) -> None:
    add_contact(gw, imap_password_user)
    answer = gw.post(message(imap_password_user))
    error = assert_error(answer, MAILBOX_NOT_CONNECTED, 503)
    assert answer.headers["Retry-After"]
    kept = settled(gw, error["details"]["id"])
    assert (kept["state"], kept["error"]) == (OutboundState.FAILED, MAILBOX_NOT_CONNECTED)


def test_out_of_scope_key_403(gw: SendGateway, imap_password_user: TestbedUser) -> None:
    add_contact(gw, imap_password_user, OTHER_SUBACCOUNT)
    other = message(imap_password_user, user=OTHER_USER, subaccount=OTHER_SUBACCOUNT)
    assert_error(gw.post(other, key=gw.acme_key), FORBIDDEN, 403)
    # a globex send (refused: no mailbox) is not readable with the acme-only key
    kept_id = gw.post(other).json()["error"]["details"]["id"]
    assert_error(gw.get(f"{MESSAGES_PATH}/{kept_id}", key=gw.acme_key), FORBIDDEN, 403)
    assert gw.get(f"{MESSAGES_PATH}/{kept_id}").status_code == 200


def test_bad_bodies_422_and_400(gw: SendGateway, imap_password_user: TestbedUser) -> None:
    good = message(imap_password_user)
    attachment = {"filename": "a.pdf", "content_type": "application/pdf", "content_base64": "%%"}
    for bad in (
        {**good, "bcc": ["x@example.test"]},  # unknown field
        {k: v for k, v in good.items() if k != "text"},  # neither text nor html
        {**good, "to": []},
        {**good, "subject": "two\r\nBcc: lines"},
        {**good, "attachments": [attachment]},  # not base64
        {**good, "kind": "newsletter"},
    ):
        assert_error(gw.post(bad), VALIDATION_FAILED, 422)
    malformed = requests.post(
        gw.url + MESSAGES_PATH,
        data=b"{nope",
        headers={"Authorization": f"Bearer {gw.all_key}", "Content-Type": "application/json"},
        timeout=30,
    )
    assert_error(malformed, MALFORMED_JSON, 400)
    assert_error(gw.post(good, **{IDEMPOTENCY_HEADER: "k" * 300}), "bad_request", 400)
    assert_error(gw.post(good), CONTACT_NOT_FOUND)  # not a contact of acme: nothing stored
    assert SEND_STATUS[CONTACT_NOT_FOUND] == 422
    assert gw.post(good, key="wrong").status_code == 401


def test_openapi_documents_the_send_routes(gw: SendGateway) -> None:
    doc = requests.get(gw.url + "/openapi.json", timeout=30).json()
    post = doc["paths"][MESSAGES_PATH]["post"]
    assert {"202", "413", "415", "429", "503"} <= set(post["responses"])
    ref = post["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    schema = doc["components"]["schemas"][ref.rsplit("/", 1)[1]]
    assert schema["additionalProperties"] is False
    assert "get" in doc["paths"][MESSAGES_PATH + "/{outbound_id}"]

"""Shared set-up of the send tests: settings pointing at the testbed, a connected mailbox."""

from __future__ import annotations

import asyncio
import urllib.parse
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import requests
from cryptography.fernet import Fernet

from gateway.config import make_settings
from gateway.mailboxes import MailboxService
from gateway.oauth import RetryPolicy
from gateway.outbound import OutboundService
from ingest.types import Provider
from storage.blobs import BlobStore
from storage.db import Database
from storage.repos.directory import add_contact
from tests.testbed.dovecot import Dovecot
from tests.testbed.oauth_server import OAuthProvider
from tests.testbed.plugin import TestbedUser
from tests.testbed.settings import imap_keys, oauth_keys, smtp_keys
from tests.testbed.submission import SubmissionServer

PUBLIC_URL = "http://127.0.0.1:9"
FLAVOUR = {Provider.GMAIL: "google", Provider.OUTLOOK: "microsoft"}
USER_EMAIL = "crm.user@acme.test"
SUBACCOUNT = "acme"


class Clock:
    """An injectable clock that tests advance."""

    def __init__(self) -> None:
        self.now = datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@dataclass
class SendEnv:
    db: Database
    mailboxes: MailboxService
    outbound: OutboundService
    blobs: BlobStore
    clock: Clock


def provider_settings(
    oauth_provider: OAuthProvider,
    dovecot: Dovecot,
    submission: SubmissionServer,
    clients: dict[Provider, Any],
    limits: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    providers: dict[str, Any] = {"imap": {"ca_file": str(dovecot.ca_file)}}
    for provider, client in clients.items():
        providers[provider.value] = {
            **oauth_keys(oauth_provider, FLAVOUR[provider], client),
            **imap_keys(dovecot),
            **smtp_keys(submission),
            **limits.get(provider.value, {}),
        }
    return providers


def build(
    db: Database,
    blobs: BlobStore,
    oauth_provider: OAuthProvider,
    dovecot: Dovecot,
    submission: SubmissionServer,
    *,
    limits: dict[str, dict[str, Any]] | None = None,
    relay: dict[str, Any] | None = None,
) -> SendEnv:
    redirect = (PUBLIC_URL + "/oauth/callback",)
    clients = {p: oauth_provider.register_client(f, redirect) for p, f in FLAVOUR.items()}
    settings = make_settings(
        security={"token_key": Fernet.generate_key().decode()},
        http={"public_url": PUBLIC_URL},
        providers=provider_settings(oauth_provider, dovecot, submission, clients, limits or {}),
        relay=relay or {},
        webhooks=[
            {"url": "http://127.0.0.1:9/hooks", "secret": "s", "events": ["message.send_failed"]}
        ],
    )
    retry = RetryPolicy(attempts=2, initial_seconds=0.01, max_seconds=0.05)
    mailboxes = MailboxService(db, settings, retry=retry)
    clock = Clock()
    outbound = OutboundService(db, settings, mailboxes, blobs, clock=clock)
    return SendEnv(db=db, mailboxes=mailboxes, outbound=outbound, blobs=blobs, clock=clock)


def _consent(auth_url: str, login: str) -> dict[str, str]:
    requests.get(auth_url, timeout=10).raise_for_status()
    answer = requests.post(
        auth_url, data={"login": login, "decision": "allow"}, allow_redirects=False, timeout=10
    )
    location = answer.headers["Location"]
    return dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(location).query))


async def connect(env: SendEnv, provider: Provider, user: TestbedUser) -> Any:
    request = await env.mailboxes.start_authorization(USER_EMAIL, SUBACCOUNT, provider)
    query = await asyncio.to_thread(_consent, request.url, user.address)
    return await env.mailboxes.finish_authorization(query["state"], code=query["code"])


async def add_recipient(env: SendEnv, contact: TestbedUser) -> None:
    """Make ``contact`` a contact of the sub-account (id 1), assigned to the CRM user."""
    await env.db.run(add_contact, 1, contact.address, "Bob Contact", USER_EMAIL)

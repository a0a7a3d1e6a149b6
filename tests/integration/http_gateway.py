"""A real HTTP gateway for tests: uvicorn in a thread, SQLite in tmp_path, testbed OAuth.

``start_gateway`` binds a free loopback port first, so ``http.public_url``
(and the OAuth redirect URI registered with the testbed server) point back
at it; the app runs on its own event loop in a thread (``uvicorn.Server``
skips signal handlers off the main thread). Used by test_http_api.py and
test_settings_page_browser.py.
"""

from __future__ import annotations

import asyncio
import secrets
import socket
import threading
import time
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests
import uvicorn
from cryptography.fernet import Fernet

from gateway.config import Settings, make_settings
from gateway.http.app import build_http_app
from gateway.http.auth import ApiKeys
from gateway.http.context import HttpContext
from gateway.mailboxes import CALLBACK_PATH, MailboxService
from gateway.oauth import RetryPolicy
from gateway.observability import Metrics
from ingest.types import Provider
from storage.db import Database
from storage.migrate import upgrade
from storage.repos.directory import add_subaccount, add_user
from tests.testbed.oauth_server import OAuthProvider
from tests.testbed.settings import oauth_keys

FLAVOUR = {Provider.GMAIL: "google", Provider.OUTLOOK: "microsoft"}
RETRY = RetryPolicy(attempts=3, initial_seconds=0.01, max_seconds=0.05)
START_TIMEOUT_SECONDS = 10.0


@dataclass(frozen=True, slots=True, kw_only=True)
class Seeded:
    """The directory rows every test gets: two sub-accounts, one user in each."""

    acme_id: int
    globex_id: int
    user_id: int
    user_email: str
    other_user_id: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Gateway:
    """A running gateway: base ``url``, its settings, the seeded rows and the API keys."""

    url: str
    settings: Settings
    seeded: Seeded
    all_key: str
    acme_key: str

    def api(self, key: str | None = None) -> requests.Session:
        """Return a requests session sending ``Authorization: Bearer <key>`` (all-key default)."""
        session = requests.Session()
        session.headers["Authorization"] = f"Bearer {key or self.all_key}"
        session.headers["Accept"] = "application/json"
        return session


def _settings(
    tmp_path: Path, public_url: str, oauth_provider: OAuthProvider, keys: tuple[str, str]
) -> Settings:
    redirect = (public_url + CALLBACK_PATH,)
    providers: dict[str, Any] = {}
    for provider, flavour in FLAVOUR.items():
        client = oauth_provider.register_client(flavour, redirect)
        providers[provider.value] = oauth_keys(oauth_provider, flavour, client)
    return make_settings(
        storage={
            "database_url": f"sqlite+aiosqlite:///{tmp_path / 'mailgate.db'}",
            "data_dir": str(tmp_path / "data"),
        },
        security={"token_key": Fernet.generate_key().decode()},
        http={
            "public_url": public_url,
            "session_secret": secrets.token_urlsafe(32),
            "api_keys": [
                {"name": "crm", "key": keys[0]},
                {"name": "acme-only", "key": keys[1], "subaccounts": ["acme"]},
            ],
        },
        providers=providers,
    )


async def _seed(database_url: str) -> Seeded:
    db = Database(database_url)
    try:
        acme = await db.run(add_subaccount, "acme")
        globex = await db.run(add_subaccount, "globex")
        user = await db.run(add_user, "crm.user@acme.test", "CRM User", [acme])
        other = await db.run(add_user, "other@globex.test", "Other User", [globex])
    finally:
        await db.close()
    return Seeded(
        acme_id=acme,
        globex_id=globex,
        user_id=user,
        user_email="crm.user@acme.test",
        other_user_id=other,
    )


async def _ready() -> tuple[bool, str]:
    return True, ""


def _serve(settings: Settings, sock: socket.socket, box: dict[str, Any]) -> None:
    async def main() -> None:
        db = Database(settings.storage.database_url)
        service = MailboxService(db, settings, retry=RETRY)
        context = HttpContext(
            db=db, settings=settings, service=service, keys=ApiKeys(settings.http.api_keys)
        )
        app = build_http_app(metrics=Metrics(), ready_check=_ready, context=context)
        config = uvicorn.Config(
            app, lifespan="off", log_config=None, access_log=False, ws="none", http="h11"
        )
        server = uvicorn.Server(config)
        box["server"] = server
        try:
            await server.serve(sockets=[sock])
        finally:
            await db.close()

    asyncio.run(main())


@contextmanager
def start_gateway(tmp_path: Path, oauth_provider: OAuthProvider) -> Iterator[Gateway]:
    """Run a gateway on a free loopback port until the context exits."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    keys = (secrets.token_urlsafe(24), secrets.token_urlsafe(24))
    settings = _settings(tmp_path, url, oauth_provider, keys)
    upgrade(settings.storage.database_url)
    seeded = asyncio.run(_seed(settings.storage.database_url))
    box: dict[str, Any] = {}
    thread = threading.Thread(target=_serve, args=(settings, sock, box), name="http-gateway")
    thread.start()
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while not (box.get("server") and box["server"].started):
        assert thread.is_alive() and time.monotonic() < deadline, "gateway did not start"
        time.sleep(0.02)
    try:
        yield Gateway(url=url, settings=settings, seeded=seeded, all_key=keys[0], acme_key=keys[1])
    finally:
        box["server"].should_exit = True
        thread.join(timeout=START_TIMEOUT_SECONDS)
        sock.close()


def consent(auth_url: str, login: str, decision: str = "allow") -> str:
    """GET the testbed consent page and POST its form as a browser would; return the redirect."""
    page = requests.get(auth_url, timeout=10)
    assert page.status_code == 200 and "id='allow'" in page.text
    answer = requests.post(
        auth_url, data={"login": login, "decision": decision}, allow_redirects=False, timeout=10
    )
    assert answer.status_code in (302, 303), answer.text
    return str(answer.headers["Location"])


def callback_query(location: str) -> dict[str, str]:
    """Return the query of a redirect to the callback."""
    return dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(location).query))

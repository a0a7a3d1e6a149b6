"""pytest plugin: the local provider testbed as fixtures.

Enable with ``pytest_plugins = ["tests.testbed.plugin"]`` in tests/conftest.py
(or ``pytest -p tests.testbed.plugin``). Session-scoped servers, all on
127.0.0.1 with free ports, torn down after the session: ``oauth_provider``,
``dovecot``, ``submission_server``. Function-scoped ``gmail_user``,
``outlook_user`` and ``imap_password_user`` give each test fresh mailboxes.
If Dovecot is missing or does not start, the fixtures fail with the reason
(they never skip).
"""

from __future__ import annotations

import secrets
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.testbed.dovecot import Dovecot, DovecotError
from tests.testbed.oauth_server import OAuthProvider
from tests.testbed.submission import SENT_FOLDERS, SubmissionServer
from tests.testbed.tokens import DEFAULT_TOKEN_TTL_SECONDS, TokenKeys

#: Domain of the generated test users (RFC 2606 reserves .test).
USER_DOMAIN = "example.test"


@dataclass(frozen=True, slots=True, kw_only=True)
class TestbedUser:
    """A fresh mailbox on the test Dovecot.

    Attributes:
        address: lower-case addr-spec, unique per test.
        layout: ``"gmail"``, ``"outlook"`` or None (plain INBOX only).
        flavour: the OAuth flavour that matches the layout, or None.
        password: PLAIN/LOGIN password for generic IMAP users, else None.
        sent_folder: where the submission server files the sender's copy, or None.
    """

    __test__ = False  # not a test class, despite the name

    address: str
    layout: str | None
    flavour: str | None
    password: str | None
    sent_folder: str | None
    keys: TokenKeys

    def mint_token(self, ttl_seconds: int = DEFAULT_TOKEN_TTL_SECONDS) -> str:
        """Return an access token for this user, valid at Dovecot and submission."""
        return self.keys.mint(self.address, ttl_seconds=ttl_seconds)


@pytest.fixture(scope="session")
def testbed_keys() -> Iterator[TokenKeys]:
    """The shared JWT signing keys (one key, a kid per user and epoch)."""
    key_dir = Path(tempfile.mkdtemp(prefix="mailgate-testbed-keys-"))
    yield TokenKeys(key_dir)
    shutil.rmtree(key_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def oauth_provider(testbed_keys: TokenKeys) -> Iterator[OAuthProvider]:
    """The local OAuth2 server (Google and Microsoft flavours), started."""
    provider = OAuthProvider(testbed_keys)
    provider.start()
    yield provider
    provider.stop()


@pytest.fixture(scope="session")
def dovecot(testbed_keys: TokenKeys, oauth_provider: OAuthProvider) -> Iterator[Dovecot]:
    """The test Dovecot, accepting the provider's tokens; fails loudly if unavailable."""
    server = Dovecot(testbed_keys)
    try:
        server.start()
    except DovecotError as exc:
        server.cleanup()
        pytest.fail(f"testbed Dovecot unavailable: {exc}", pytrace=False)
    yield server
    server.cleanup()


@pytest.fixture(scope="session")
def submission_server(testbed_keys: TokenKeys, dovecot: Dovecot) -> Iterator[SubmissionServer]:
    """The provider-like submission server delivering into the test Dovecot."""
    server = SubmissionServer(
        testbed_keys, dovecot, cert_file=dovecot.ca_file, key_file=dovecot.root / "key.pem"
    )
    server.start()
    yield server
    server.stop()


@pytest.fixture
def submission(submission_server: SubmissionServer) -> Iterator[SubmissionServer]:
    """``submission_server`` with its per-test options reset afterwards."""
    yield submission_server
    submission_server.rewrite_message_id = False
    submission_server.fail_next(0)
    submission_server.lose_next_replies(0)


def make_user(
    dovecot: Dovecot, keys: TokenKeys, layout: str | None, password: str | None = None
) -> TestbedUser:
    """Add a unique user to ``dovecot`` and create its folder layout."""
    address = f"u{secrets.token_hex(5)}@{USER_DOMAIN}"
    dovecot.add_user(address, password)
    if layout is not None:
        dovecot.create_layout(address, layout)
    flavour = {"gmail": "google", "outlook": "microsoft"}.get(layout or "")
    return TestbedUser(
        address=address,
        layout=layout,
        flavour=flavour,
        password=password,
        sent_folder=SENT_FOLDERS.get(layout or ""),
        keys=keys,
    )


@pytest.fixture
def gmail_user(dovecot: Dovecot, testbed_keys: TokenKeys) -> TestbedUser:
    """A fresh user with the Gmail folder layout."""
    return make_user(dovecot, testbed_keys, "gmail")


@pytest.fixture
def outlook_user(dovecot: Dovecot, testbed_keys: TokenKeys) -> TestbedUser:
    """A fresh user with the Outlook folder layout."""
    return make_user(dovecot, testbed_keys, "outlook")


@pytest.fixture
def imap_password_user(dovecot: Dovecot, testbed_keys: TokenKeys) -> TestbedUser:
    """A fresh generic IMAP user with a password (PLAIN/LOGIN) and only INBOX."""
    return make_user(dovecot, testbed_keys, None, password=secrets.token_urlsafe(12))

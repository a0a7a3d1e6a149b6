"""Which watchers run: one per (provider account, folder role), R4."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime

from gateway.config import make_settings
from gateway.imap.supervisor import CONNECTIONS_PER_ACCOUNT, choose_targets
from gateway.imap.watcher import FOLDER_ROLES
from ingest.types import MailboxId, MailboxState, Provider, SubaccountId, UserId
from storage.repos.mailboxes import MailboxRecord

AT = datetime(2026, 11, 30, 9, 0, tzinfo=UTC)


def record(mailbox_id: int, address: str, state: MailboxState, subaccount: int) -> MailboxRecord:
    return MailboxRecord(
        id=MailboxId(mailbox_id),
        user_id=UserId(1),
        subaccount_id=SubaccountId(subaccount),
        provider=Provider.GMAIL,
        address=address,
        state=state,
        connected_at=AT,
        disconnected_at=None,
        last_sync_at=None,
        last_error=None,
        token_expires_at=None,
        server_settings=None,
        replaced_by_mailbox_id=None,
        has_credentials=True,
    )


def test_r4_same_gmail_in_two_subaccounts_is_watched_once_through_oldest_row() -> None:
    records = [
        record(3, "Ann@Example.test", MailboxState.CONNECTED, 2),
        record(2, "ann@example.test", MailboxState.CONNECTED, 1),
        record(4, "bob@example.test", MailboxState.REAUTH_REQUIRED, 1),
        record(5, "cid@example.test", MailboxState.DISCONNECTED, 1),
    ]
    targets = choose_targets(make_settings(), records)
    assert sorted(targets) == [(MailboxId(2), role) for role in sorted(FOLDER_ROLES)]
    assert len(targets) == CONNECTIONS_PER_ACCOUNT
    assert {t.endpoint.host for t in targets.values()} == {"imap.gmail.com"}


def test_generic_imap_watched_only_with_server_settings() -> None:
    bare = replace(record(7, "x@example.test", MailboxState.CONNECTED, 1), provider=Provider.IMAP)
    assert choose_targets(make_settings(), [bare]) == {}
    server = {"imap_host": "imap.example.test", "imap_port": 143, "imap_security": "starttls"}
    configured = replace(bare, server_settings=server)
    targets = choose_targets(make_settings(), [configured])
    assert {t.password_login for t in targets.values()} == {True}
    assert {(t.endpoint.host, t.endpoint.port) for t in targets.values()} == {
        ("imap.example.test", 143)
    }

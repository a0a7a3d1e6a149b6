"""``mailgate mailbox`` text output: the sync-lag format and the list/show line."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from gateway.cli_mailbox import _line, format_lag
from ingest.types import MailboxId, MailboxState, Provider, SubaccountId, UserId
from storage.repos.mailboxes import MailboxRecord


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [
        (None, "-"),
        (0.0, "0.0s"),
        (-3.0, "0.0s"),
        (0.46, "0.4s"),
        (9.99, "9.9s"),
        (10.0, "10s"),
        (59.9, "59s"),
        (60.0, "1m00s"),
        (725.0, "12m05s"),
        (3599.0, "59m59s"),
        (3600.0, "1h00m"),
        (3 * 3600 + 4 * 60 + 59, "3h04m"),
        (86400.0, "1d00h"),
        (2 * 86400 + 3 * 3600 + 1, "2d03h"),
    ],
)
def test_format_lag(seconds: float | None, shown: str) -> None:
    assert format_lag(seconds) == shown


def record(lag: float | None, error: str | None = None) -> MailboxRecord:
    return MailboxRecord(
        id=MailboxId(4),
        user_id=UserId(1),
        subaccount_id=SubaccountId(2),
        provider=Provider.GMAIL,
        address="ann@example.test",
        state=MailboxState.CONNECTED,
        connected_at=None,
        disconnected_at=None,
        last_sync_at=datetime(2026, 11, 30, 12, 0, tzinfo=UTC),
        sync_lag_seconds=lag,
        last_error=error,
        token_expires_at=None,
        server_settings=None,
        replaced_by_mailbox_id=None,
        has_credentials=True,
    )


def test_line_shows_lag_between_last_sync_and_error() -> None:
    assert _line(record(725.0, "TimeoutError: x")).split("\t") == [
        "4",
        "gmail",
        "ann@example.test",
        "connected",
        "last sync 2026-11-30T12:00:00+00:00",
        "lag 12m05s",
        "TimeoutError: x",
    ]
    assert _line(record(None)).endswith("\tlag -")

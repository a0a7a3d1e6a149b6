"""The durable spool: what is written is read back exactly, in arrival order."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from gateway.spool import TMP_PREFIX, Spool, SpoolCorrupt
from ingest.types import SmtpEnvelope

ENVELOPE = SmtpEnvelope(
    envelope_sender="alice@example.org",
    envelope_recipients=("u-aaaaaaaaaaaaaaaaaaaa@bcc.test",),
    peer="127.0.0.1",
    helo="client.example",
    received_at=datetime(2024, 5, 1, 12, 0, tzinfo=UTC),
)


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    spool = Spool(tmp_path / "spool")
    spool.open()
    return spool


def test_round_trip_keeps_bytes_and_envelope(spool: Spool) -> None:
    raw = b"From: a@example.org\r\n\r\n\x00\xff 8-bit \r\n.\r\nlast"
    path = spool.write(raw, ENVELOPE)
    entry = spool.read(path)
    assert entry.raw == raw
    assert entry.envelope == ENVELOPE


def test_pending_in_arrival_order_and_remove(spool: Spool) -> None:
    paths = [spool.write(f"m{i}".encode(), ENVELOPE) for i in range(5)]
    assert spool.pending() == tuple(paths)
    spool.remove(tuple(paths[:3]))
    assert spool.pending() == tuple(paths[3:])


def test_incomplete_writes_deleted_at_open(spool: Spool) -> None:
    stale = spool.root / f"{TMP_PREFIX}123.msg"
    stale.write_bytes(b"half")
    spool.open()
    assert not stale.exists()
    assert spool.pending() == ()


def test_corrupt_entry_raises_and_is_set_aside(spool: Spool) -> None:
    bad = spool.root / "00000000000000000001-x.msg"
    bad.write_bytes(b"garbage without framing")
    with pytest.raises(SpoolCorrupt):
        spool.read(bad)
    moved = spool.set_aside(bad)
    assert moved.read_bytes() == b"garbage without framing"
    assert spool.pending() == ()

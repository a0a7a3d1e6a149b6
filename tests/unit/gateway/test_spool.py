"""The durable spool: what is written is read back exactly, in arrival order."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import pytest

from gateway.spool import SHRINK_SLACK_BYTES, TMP_PREFIX, Spool, SpoolCorrupt
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


def test_cleared_slots_are_reused_instead_of_new_files(spool: Spool) -> None:
    first = [spool.write(b"one %d" % i, ENVELOPE) for i in range(3)]
    spool.remove(tuple(first))
    assert spool.pending() == ()
    again = [spool.write(b"two %d" % i, ENVELOPE) for i in range(3)]
    assert sorted(again) == sorted(first)  # no file created, none deleted
    assert sorted(spool.root.iterdir()) == sorted(first)
    assert [spool.read(p).raw for p in spool.pending()] == [b"two 0", b"two 1", b"two 2"]


def test_free_slots_are_found_again_at_open(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    spool.open()
    kept, cleared = spool.write(b"kept", ENVELOPE), spool.write(b"cleared", ENVELOPE)
    spool.remove((cleared,))
    restarted = Spool(tmp_path / "spool")
    restarted.open()
    assert restarted.pending() == (kept,)
    assert restarted.write(b"new", ENVELOPE) == cleared  # the free slot, not a new one
    assert {p.name for p in restarted.root.iterdir()} == {kept.name, cleared.name}


def test_entry_cut_short_by_a_crash_is_corrupt(spool: Spool) -> None:
    path = spool.write(b"x" * 1000, ENVELOPE)
    data = path.read_bytes()
    path.write_bytes(data[:-10])  # the process died during the write
    with pytest.raises(SpoolCorrupt, match="cut short"):
        spool.read(path)


def test_concurrent_writes_get_distinct_slots(spool: Spool) -> None:
    with ThreadPoolExecutor(8) as pool:
        paths = list(pool.map(lambda i: spool.write(b"m%d" % i, ENVELOPE), range(64)))
    assert len(set(paths)) == 64
    assert sorted(spool.read(p).raw for p in paths) == sorted(b"m%d" % i for i in range(64))


def test_a_cleared_slot_keeps_its_blocks_and_is_not_pending(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    spool.open()
    path = spool.write(b"x" * 5000, ENVELOPE)
    size = path.stat().st_size
    spool.remove((path,))
    assert path.stat().st_size == size  # not truncated: no blocks freed and re-allocated
    assert spool.pending() == ()
    restarted = Spool(tmp_path / "spool")
    restarted.open()
    assert restarted.pending() == ()
    assert restarted.write(b"short", ENVELOPE) == path  # found free again
    assert restarted.read(path).raw == b"short"  # the old entry's tail is ignored
    assert restarted.pending() == (path,)


def test_a_write_torn_over_an_older_longer_entry_is_corrupt(spool: Spool) -> None:
    """The process died while writing a short entry over a longer one: never read as mail."""
    path = spool.write(b"A" * 5000, ENVELOPE)
    spool.remove((path,))
    assert spool.write(b"B" * 1000, ENVELOPE) == path
    data = bytearray(path.read_bytes())
    start = data.index(b"\n") + 1
    data[start + 500 : start + 1000] = b"A" * 500  # only 500 new bytes reached the file
    path.write_bytes(bytes(data))
    with pytest.raises(SpoolCorrupt, match="torn"):
        spool.read(path)


def test_a_slot_much_longer_than_its_new_entry_is_cut_back(spool: Spool) -> None:
    path = spool.write(b"L" * (SHRINK_SLACK_BYTES + 4096), ENVELOPE)
    spool.remove((path,))
    assert spool.write(b"small", ENVELOPE) == path
    assert path.stat().st_size < 4096
    assert spool.read(path).raw == b"small"


OLD_ENVELOPE_JSON = (
    b'{"envelope_sender": "alice@example.org", "envelope_recipients": '
    b'["u-aaaaaaaaaaaaaaaaaaaa@bcc.test"], "peer": "127.0.0.1", "helo": '
    b'"client.example", "received_at": "2024-05-01T12:00:00+00:00"}'
)


@pytest.mark.parametrize(
    ("name", "head"),
    [
        ("00000000000000000005-abc.msg", b"MGSPOOL1 "),  # version 1: one file per entry
        ("slot-000009.msg", b"MGSPOOL2 5 9 "),  # version 2: truncated slots, exact length
    ],
)
def test_entries_of_older_formats_are_still_recovered(spool: Spool, name: str, head: bytes) -> None:
    old = spool.root / name
    old.write_bytes(head + OLD_ENVELOPE_JSON + b"\nold bytes")
    newer = spool.write(b"new bytes", ENVELOPE)
    assert spool.pending() == (old, newer)
    entry = spool.read(old)
    assert (entry.raw, entry.envelope) == (b"old bytes", ENVELOPE)
    spool.remove((old,))
    assert spool.pending() == (newer,)
    assert old.exists() == (head != b"MGSPOOL1 ")  # a version-1 file is deleted, a slot freed

"""Durable spool of received messages, written before they are processed.

A message is spooled (raw bytes + SMTP envelope in one file) before the
pipeline runs, and the entry is cleared only after the database commit. At
start-up every entry left over is processed again; R12 identity makes a
second pass harmless.

Why no fsync here: the spool guards against the *process* dying between
DATA and COMMIT (a crash, SIGKILL, OOM): the page cache keeps the file, and
the next start processes it. Against a machine crash it adds nothing,
because no 250 has been sent yet, so the client still holds the message
and retries (RFC 5321 §4.5.4.1). Durability of acknowledged mail comes
from the blob store (fsynced) and the database COMMIT, both before the 250.
Dropping the two fsyncs per message here shortened every SMTP round trip;
the crash test (SIGKILL mid-stream) checks the guarantee.

Why slots: entries live in reusable files ``slot-<n>.msg`` — a write
truncates and rewrites a free slot, clearing an entry truncates it to
zero bytes and frees the slot. Creating and deleting one file per message
made inode allocation the gateway's largest CPU cost under
bench/bench_smtp.py (perf: ``__ext4_new_inode`` 25 % of the process's CPU,
scanning recently deleted inodes). There are as many slots as messages
were ever in flight at once.

File format (one entry per non-empty slot)::

    MGSPOOL2 <sequence> <raw length> <JSON envelope>\n<raw RFC 5322 bytes>

``sequence`` orders entries by arrival; ``raw length`` tells a complete
entry from one cut short by a crash during its write (never acknowledged:
``read`` raises ``SpoolCorrupt`` and it is set aside). Entries in the
version-1 format (``<ns-timestamp>-<hex>.msg``: ``MGSPOOL1 <JSON>\n<raw>``)
left by an older version are still recovered. Blocking calls: every method
here does file I/O and must be called via ``asyncio.to_thread`` from async
code; ``write`` and ``remove`` may run on several threads at once.
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from ingest.types import SmtpEnvelope

MAGIC = b"MGSPOOL2 "
MAGIC_V1 = b"MGSPOOL1 "
SUFFIX = ".msg"
SLOT_PREFIX = "slot-"
TMP_PREFIX = ".tmp-"


class SpoolCorrupt(ValueError):
    """A spool file whose framing cannot be read (kept aside, never dropped)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class SpoolEntry:
    """One spooled message.

    Attributes:
        path: the spool file.
        raw: the message bytes exactly as received.
        envelope: the SMTP envelope it came with.
    """

    path: Path
    raw: bytes
    envelope: SmtpEnvelope


def _encode_envelope(envelope: SmtpEnvelope) -> bytes:
    return json.dumps(
        {
            "envelope_sender": envelope.envelope_sender,
            "envelope_recipients": list(envelope.envelope_recipients),
            "peer": envelope.peer,
            "helo": envelope.helo,
            "received_at": envelope.received_at.isoformat(),
        },
        ensure_ascii=True,
    ).encode("ascii")


def _decode_envelope(data: bytes) -> SmtpEnvelope:
    fields = json.loads(data)
    return SmtpEnvelope(
        envelope_sender=str(fields["envelope_sender"]),
        envelope_recipients=tuple(str(r) for r in fields["envelope_recipients"]),
        peer=str(fields["peer"]),
        helo=str(fields["helo"]),
        received_at=datetime.fromisoformat(fields["received_at"]),
    )


class Spool:
    """A directory of spooled messages (``<data_dir>/spool``) in reusable slot files."""

    def __init__(self, root: Path) -> None:
        """Use ``root`` (created by ``open``) as the spool directory."""
        self.root = root
        self._lock = threading.Lock()
        self._free: list[Path] = []
        self._next_slot = 0

    def open(self) -> None:
        """Create the directory, delete incomplete writes of an older version, find free slots.

        Call once at start-up, before ``write``.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        for stale in self.root.glob(f"{TMP_PREFIX}*"):
            stale.unlink(missing_ok=True)
        slots = sorted(self.root.glob(f"{SLOT_PREFIX}*{SUFFIX}"))
        with self._lock:
            self._free = [slot for slot in slots if slot.stat().st_size == 0]
            numbers = (_slot_number(slot) for slot in slots)
            self._next_slot = max((n for n in numbers if n is not None), default=-1) + 1

    def write(self, raw: bytes, envelope: SmtpEnvelope) -> Path:
        """Store one message in a free slot (a new one when none is free); return its path.

        Raises:
            OSError: the disk refused the write (transient for the client);
                the slot is freed again.
        """
        slot = self._take_slot()
        head = b"%s%d %d " % (MAGIC, time.time_ns(), len(raw))
        try:
            with slot.open("wb") as handle:  # truncates a reused slot
                handle.write(head + _encode_envelope(envelope) + b"\n")
                handle.write(raw)
        except OSError:
            self._clear(slot)
            raise
        return slot

    def remove(self, paths: tuple[Path, ...]) -> None:
        """Clear processed entries (a slot is emptied and reused; a version-1 file is deleted)."""
        for path in paths:
            if _slot_number(path) is None:
                path.unlink(missing_ok=True)
            else:
                self._clear(path)

    def pending(self) -> tuple[Path, ...]:
        """Return leftover entries in arrival order (unreadable ones first, to be set aside)."""
        entries = [
            path
            for path in self.root.glob(f"*{SUFFIX}")
            if not path.name.startswith(TMP_PREFIX) and path.stat().st_size > 0
        ]
        return tuple(sorted(entries, key=_arrival_key))

    def read(self, path: Path) -> SpoolEntry:
        """Load one entry.

        Raises:
            SpoolCorrupt: the framing is broken, or the entry was cut short.
            OSError: the file cannot be read.
        """
        data = path.read_bytes()
        head, sep, raw = data.partition(b"\n")
        if not sep:
            raise SpoolCorrupt(f"{path.name}: bad spool framing")
        if head.startswith(MAGIC):
            fields = head[len(MAGIC) :].split(b" ", 2)
            if len(fields) != 3 or not fields[1].isdigit():
                raise SpoolCorrupt(f"{path.name}: bad spool framing")
            if int(fields[1]) != len(raw):
                raise SpoolCorrupt(
                    f"{path.name}: entry cut short ({len(raw)} of {int(fields[1])} bytes)"
                )
            envelope_json = fields[2]
        elif head.startswith(MAGIC_V1):
            envelope_json = head[len(MAGIC_V1) :]
        else:
            raise SpoolCorrupt(f"{path.name}: bad spool framing")
        try:
            envelope = _decode_envelope(envelope_json)
        except (ValueError, KeyError, TypeError) as exc:
            raise SpoolCorrupt(f"{path.name}: bad envelope") from exc
        return SpoolEntry(path=path, raw=raw, envelope=envelope)

    def set_aside(self, path: Path) -> Path:
        """Move an unreadable entry to ``<root>/corrupt/`` for a human to look at."""
        target = self.root / "corrupt" / f"{time.time_ns()}-{path.name}"
        target.parent.mkdir(exist_ok=True)
        path.rename(target)
        return target

    def _take_slot(self) -> Path:
        with self._lock:
            if self._free:
                return self._free.pop()
            number = self._next_slot
            self._next_slot += 1
        return self.root / f"{SLOT_PREFIX}{number:06d}{SUFFIX}"

    def _clear(self, slot: Path) -> None:
        try:
            os.truncate(slot, 0)
        except FileNotFoundError:
            return  # set aside meanwhile: the slot is gone, a new one will be made
        with self._lock:
            self._free.append(slot)


def _slot_number(path: Path) -> int | None:
    """The slot number of ``slot-<n>.msg``, or None for any other name."""
    name = path.name
    if not (name.startswith(SLOT_PREFIX) and name.endswith(SUFFIX)):
        return None
    digits = name[len(SLOT_PREFIX) : -len(SUFFIX)]
    return int(digits) if digits.isdigit() else None


def _arrival_key(path: Path) -> tuple[int, str]:
    """Sort key: the entry's sequence (slots) or name timestamp (version 1); 0 if unreadable."""
    with path.open("rb") as handle:
        head = handle.read(64)
    if head.startswith(MAGIC):
        sequence = head[len(MAGIC) :].split(b" ", 1)[0]
        return (int(sequence) if sequence.isdigit() else 0, path.name)
    stamp = path.name.split("-", 1)[0]
    return (int(stamp) if stamp.isdigit() else 0, path.name)

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

Why slots: entries live in reusable files ``slot-<n>.msg``. Creating and
deleting one file per message made inode allocation the gateway's largest
CPU cost under bench/bench_smtp.py (perf: ``__ext4_new_inode`` 25 % of the
process's CPU, scanning recently deleted inodes). There are as many slots
as messages were ever in flight at once.

Why no truncation: a slot is reused in place. A write overwrites it from
offset 0 without ``O_TRUNC``, and clearing an entry overwrites only its
first bytes with ``FREE_MARK``; the file keeps its blocks. Truncating to
zero on every clear (version 2) freed and re-allocated a message's blocks
each time, with online discard on this VM's ext4: the batch's syncfs then
waited 4.5–5.2 ms instead of ~2 ms, and bench/bench_smtp.py stored 378–404
instead of 413–433 msg/s (docs/storage.md). A slot longer than
``SHRINK_SLACK_BYTES`` beyond its new entry is cut back, so one large
message does not keep its size in the slot for ever.

File format (one entry per slot)::

    MGSPOOL3 <sequence> <raw length> <raw SHA-256> <JSON envelope>\n<raw RFC 5322 bytes>[stale tail]

``sequence`` orders entries by arrival. An entry is complete only when at
least ``raw length`` bytes follow the header and their SHA-256 matches:
bytes beyond that are what an earlier, longer entry left, and a write cut
short by a crash (never acknowledged) fails the length or checksum test —
``read`` raises ``SpoolCorrupt`` and the entry is set aside. Entries in the
older formats are still recovered: version 2 (``MGSPOOL2 <sequence> <raw
length> <JSON>``, truncated slots, exact length) and version 1
(``<ns-timestamp>-<hex>.msg``: ``MGSPOOL1 <JSON>\n<raw>``). Blocking calls:
every method here does file I/O and must be called via
``asyncio.to_thread`` from async code, or be short (an entry of a small
message); ``write`` and ``remove`` may run on several threads at once.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from ingest.types import SmtpEnvelope

MAGIC = b"MGSPOOL3 "
MAGIC_V2 = b"MGSPOOL2 "
MAGIC_V1 = b"MGSPOOL1 "
FREE_MARK = b"MGSPOOL- "
"""Written over a cleared slot's first bytes (the same length as the magics)."""
SHRINK_SLACK_BYTES = 1 << 20
"""A slot this much longer than the entry written into it is truncated to the entry."""
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
            self._free = [slot for slot in slots if _is_free(slot)]
            numbers = (_slot_number(slot) for slot in slots)
            self._next_slot = max((n for n in numbers if n is not None), default=-1) + 1

    def write(self, raw: bytes, envelope: SmtpEnvelope, sha256: str | None = None) -> Path:
        """Store one message in a free slot (a new one when none is free); return its path.

        Args:
            raw: the message bytes.
            envelope: its SMTP envelope.
            sha256: ``raw``'s lowercase hex SHA-256 when the caller has it; None computes it.

        Raises:
            OSError: the disk refused the write (transient for the client);
                the slot is freed again.
        """
        digest = sha256 if sha256 is not None else hashlib.sha256(raw).hexdigest()
        slot = self._take_slot()
        head = b"%s%d %d %s " % (MAGIC, time.time_ns(), len(raw), digest.encode("ascii"))
        entry = head + _encode_envelope(envelope) + b"\n" + raw
        try:
            fd = os.open(slot, os.O_WRONLY | os.O_CREAT, 0o600)  # no O_TRUNC: see module docstring
            try:
                view = memoryview(entry)
                while view:
                    view = view[os.write(fd, view) :]
                if os.fstat(fd).st_size > len(entry) + SHRINK_SLACK_BYTES:
                    os.ftruncate(fd, len(entry))
            finally:
                os.close(fd)
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
            if not path.name.startswith(TMP_PREFIX) and not _is_free(path)
        ]
        return tuple(sorted(entries, key=_arrival_key))

    def read(self, path: Path) -> SpoolEntry:
        """Load one entry.

        Raises:
            SpoolCorrupt: the framing is broken, or the entry was cut short.
            OSError: the file cannot be read.
        """
        data = path.read_bytes()
        head, sep, rest = data.partition(b"\n")
        if not sep:
            raise SpoolCorrupt(f"{path.name}: bad spool framing")
        if head.startswith(MAGIC):
            fields = head[len(MAGIC) :].split(b" ", 3)
            if len(fields) != 4 or not fields[1].isdigit():
                raise SpoolCorrupt(f"{path.name}: bad spool framing")
            length = int(fields[1])
            if len(rest) < length:
                raise SpoolCorrupt(f"{path.name}: entry cut short ({len(rest)} of {length} bytes)")
            raw = rest[:length]
            if hashlib.sha256(raw).hexdigest().encode("ascii") != fields[2]:
                raise SpoolCorrupt(f"{path.name}: entry torn (SHA-256 mismatch)")
            envelope_json = fields[3]
        elif head.startswith(MAGIC_V2):
            fields = head[len(MAGIC_V2) :].split(b" ", 2)
            if len(fields) != 3 or not fields[1].isdigit():
                raise SpoolCorrupt(f"{path.name}: bad spool framing")
            raw = rest
            if int(fields[1]) != len(raw):
                raise SpoolCorrupt(
                    f"{path.name}: entry cut short ({len(raw)} of {int(fields[1])} bytes)"
                )
            envelope_json = fields[2]
        elif head.startswith(MAGIC_V1):
            raw = rest
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
            fd = os.open(slot, os.O_WRONLY)
        except FileNotFoundError:
            return  # set aside meanwhile: the slot is gone, a new one will be made
        try:
            os.pwrite(fd, FREE_MARK, 0)
        finally:
            os.close(fd)
        with self._lock:
            self._free.append(slot)


def _slot_number(path: Path) -> int | None:
    """The slot number of ``slot-<n>.msg``, or None for any other name."""
    name = path.name
    if not (name.startswith(SLOT_PREFIX) and name.endswith(SUFFIX)):
        return None
    digits = name[len(SLOT_PREFIX) : -len(SUFFIX)]
    return int(digits) if digits.isdigit() else None


def _is_free(path: Path) -> bool:
    """Whether ``path`` holds no entry: empty (version 2) or marked free."""
    with path.open("rb") as handle:
        head = handle.read(len(FREE_MARK))
    return head in (b"", FREE_MARK)


def _arrival_key(path: Path) -> tuple[int, str]:
    """Sort key: the entry's sequence (slots) or name timestamp (version 1); 0 if unreadable."""
    with path.open("rb") as handle:
        head = handle.read(64)
    for magic in (MAGIC, MAGIC_V2):
        if head.startswith(magic):
            sequence = head[len(magic) :].split(b" ", 1)[0]
            return (int(sequence) if sequence.isdigit() else 0, path.name)
    stamp = path.name.split("-", 1)[0]
    return (int(stamp) if stamp.isdigit() else 0, path.name)

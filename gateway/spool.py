"""Durable spool of received messages, written before they are processed.

A message is spooled (raw bytes + SMTP envelope in one file: temp file,
then rename) before the pipeline runs, and the entry is removed only after
the database commit. At start-up every entry left over is processed again;
R12 identity makes a second pass harmless.

Why no fsync here: the spool guards against the *process* dying between
DATA and COMMIT (a crash, SIGKILL, OOM): the page cache keeps the file, and
the next start processes it. Against a machine crash it adds nothing,
because no 250 has been sent yet, so the client still holds the message
and retries (RFC 5321 §4.5.4.1). Durability of acknowledged mail comes
from the blob store (fsynced) and the database COMMIT, both before the 250.
Dropping the two fsyncs per message here shortened every SMTP round trip;
the crash test (SIGKILL mid-stream) checks the guarantee.

File format (one file per message, ``<ns-timestamp>-<hex>.msg``)::

    MGSPOOL1 <JSON envelope>\\n<raw RFC 5322 bytes, unmodified>

Names sort in arrival order. Files named ``.tmp-*`` are incomplete writes of
a crashed process and are deleted at start-up (they were never
acknowledged). Blocking calls: every method here does file I/O and must
be called via ``asyncio.to_thread`` from async code.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from ingest.types import SmtpEnvelope

MAGIC = b"MGSPOOL1 "
SUFFIX = ".msg"
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
    """A directory of spooled messages (``<data_dir>/spool``)."""

    def __init__(self, root: Path) -> None:
        """Use ``root`` (created if missing) as the spool directory."""
        self.root = root

    def open(self) -> None:
        """Create the directory and delete incomplete writes of a crashed run."""
        self.root.mkdir(parents=True, exist_ok=True)
        for stale in self.root.glob(f"{TMP_PREFIX}*"):
            stale.unlink(missing_ok=True)

    def write(self, raw: bytes, envelope: SmtpEnvelope) -> Path:
        """Durably store one message and return its spool path.

        Raises:
            OSError: the disk refused the write (transient for the client).
        """
        name = f"{time.time_ns():020d}-{uuid.uuid4().hex}{SUFFIX}"
        tmp = self.root / f"{TMP_PREFIX}{name}"
        final = self.root / name
        with tmp.open("wb") as handle:
            handle.write(MAGIC + _encode_envelope(envelope) + b"\n")
            handle.write(raw)
        tmp.rename(final)  # atomic: a reader never sees a half-written entry
        return final

    def remove(self, paths: tuple[Path, ...]) -> None:
        """Delete processed entries (missing files are ignored)."""
        for path in paths:
            path.unlink(missing_ok=True)

    def pending(self) -> tuple[Path, ...]:
        """Return leftover entries in arrival order."""
        return tuple(sorted(self.root.glob(f"*{SUFFIX}")))

    def read(self, path: Path) -> SpoolEntry:
        """Load one entry.

        Raises:
            SpoolCorrupt: the framing is broken.
            OSError: the file cannot be read.
        """
        data = path.read_bytes()
        head, sep, raw = data.partition(b"\n")
        if not sep or not head.startswith(MAGIC):
            raise SpoolCorrupt(f"{path.name}: bad spool framing")
        try:
            envelope = _decode_envelope(head[len(MAGIC) :])
        except (ValueError, KeyError, TypeError) as exc:
            raise SpoolCorrupt(f"{path.name}: bad envelope") from exc
        return SpoolEntry(path=path, raw=raw, envelope=envelope)

    def set_aside(self, path: Path) -> Path:
        """Move an unreadable entry to ``<root>/corrupt/`` for a human to look at."""
        target = self.root / "corrupt" / path.name
        target.parent.mkdir(exist_ok=True)
        path.rename(target)
        return target

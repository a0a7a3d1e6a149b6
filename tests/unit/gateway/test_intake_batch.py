"""The group-commit batch's helpers: checkpoint runs and deferred blob writes (no database)."""

from __future__ import annotations

import asyncio
import hashlib
import random
from datetime import UTC, datetime
from pathlib import Path

import pytest

from gateway.intake import raw_message
from gateway.intake_batch import BatchBlobs, IntakeJob, checkpoint_runs
from ingest.types import ImapOrigin, MailboxId, SmtpEnvelope, Uid, UidValidity
from storage.blobs import BlobStore

SMTP = SmtpEnvelope(
    envelope_sender="a@example.test",
    envelope_recipients=("b@example.test",),
    peer="127.0.0.1",
    helo="test",
    received_at=datetime(2026, 11, 30, tzinfo=UTC),
)


def _job(
    loop: asyncio.AbstractEventLoop,
    uid: int | None,
    previous: int | None,
    folder: str = "INBOX",
    *,
    blobs: tuple[bytes, ...] = (),
) -> IntakeJob:
    provenance: SmtpEnvelope | ImapOrigin = SMTP
    if uid is not None:
        provenance = ImapOrigin(
            mailbox_id=MailboxId(1),
            folder=folder,
            folder_role="inbox",
            uidvalidity=UidValidity(7),
            uid=Uid(uid),
        )
    return IntakeJob(
        message=raw_message(b"Subject: x\r\n\r\nbody\r\n", provenance),
        prepared=None,
        failure=None,
        spool_path=None,
        future=loop.create_future(),
        previous_uid=previous,
        blobs=blobs,
        blob_keys=tuple(hashlib.sha256(b).hexdigest() for b in blobs),
    )


def _uids(runs: list[tuple[IntakeJob, IntakeJob]]) -> list[tuple[int | None, int]]:
    out = []
    for first, last in runs:
        assert isinstance(last.message.provenance, ImapOrigin)
        out.append((first.previous_uid, int(last.message.provenance.uid)))
    return out


def test_a_uid_chain_is_one_run_and_anything_else_ends_it() -> None:
    loop = asyncio.new_event_loop()
    try:
        jobs = [
            _job(loop, 11, 10),
            _job(loop, 12, 11),
            _job(loop, None, None),  # an SMTP message: skipped, the chain goes on
            _job(loop, 15, 12),
            _job(loop, 3, 2, folder="Sent"),  # another folder
            _job(loop, 16, 15),  # back to INBOX: a new run
            _job(loop, 20, 18),  # the chain restarted (not 16)
            _job(loop, 21, None),  # no chain check: alone
        ]
        assert _uids(checkpoint_runs(jobs)) == [
            (10, 15),
            (2, 3),
            (15, 16),
            (18, 20),
            (None, 21),
        ]
    finally:
        loop.close()


def _advance(checkpoint: int, uid: int, previous: int | None) -> int:
    """storage.repos.folders.advance_checkpoint's condition, on one folder."""
    floor = previous if previous is not None else 0
    return uid if floor <= checkpoint < uid else checkpoint


@pytest.mark.parametrize("seed", range(200))
def test_advancing_per_run_ends_where_advancing_per_message_ends(seed: int) -> None:
    rng = random.Random(seed)
    loop = asyncio.new_event_loop()
    try:
        jobs, uid = [], rng.randint(0, 5)
        start = uid if rng.random() < 0.7 else uid + 1  # sometimes a gap before the batch
        for _ in range(rng.randint(1, 12)):
            previous: int | None = uid
            if rng.random() < 0.15:
                previous = rng.choice([None, uid - 1, uid + 2])
            uid += rng.randint(1, 3)
            jobs.append(_job(loop, uid, previous))
        for checkpoint in (start - 1, start, start + 2, uid):
            per_message = checkpoint
            for job in jobs:
                assert isinstance(job.message.provenance, ImapOrigin)
                per_message = _advance(per_message, job.message.provenance.uid, job.previous_uid)
            per_run = checkpoint
            for first, last in checkpoint_runs(jobs):
                assert isinstance(last.message.provenance, ImapOrigin)
                per_run = _advance(per_run, last.message.provenance.uid, first.previous_uid)
            assert per_run == per_message
    finally:
        loop.close()


def test_batch_blobs_defers_unknown_blobs_until_write_deferred(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "blobs")
    loop = asyncio.new_event_loop()
    try:
        known = b"raw bytes the batch writes itself"
        blobs = BatchBlobs(store, [_job(loop, 1, 0, blobs=(known,))])
        assert blobs.put(known) == hashlib.sha256(known).hexdigest()
        attachment = b"an attachment nobody wrote ahead"
        key = blobs.put(attachment)
        assert key == hashlib.sha256(attachment).hexdigest()
        assert blobs.put(bytes(attachment)) == key  # equal bytes, another object: same key
        assert not store.path(key).exists()  # nothing written before the batch's end
        blobs.write_deferred()
        assert store.path(key).read_bytes() == attachment
        assert not store.path(hashlib.sha256(known).hexdigest()).exists()  # not ours to write
    finally:
        loop.close()

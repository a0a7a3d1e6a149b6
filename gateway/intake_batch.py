"""The group-commit batch's transaction: facts, decisions and rows for every job of a batch.

Edge module, synchronous: ``BatchRunner.run`` is the ONE function
``gateway.intake`` hands to ``Database.run`` per batch (on SQLite it runs on
the database thread, on PostgreSQL inside ``run_sync``). It loads the
batch's facts once (``storage.repos.batch.BatchFacts``), decides and
applies each job in turn (rows nothing reads before the end held in a
``RowBuffer`` and inserted once per table), advances IMAP checkpoints, and
waits for the batch's blobs before returning (the COMMIT follows). It does
not commit, does not answer anyone and never touches the event loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from sqlalchemy.orm import Session

from gateway.config import BccSettings
from gateway.intake_result import IntakeResult, IntakeStatus
from ingest.pipeline import decide
from ingest.types import AuthResult, ImapOrigin, Prepared, Provider, RawMessage, RouteSettings
from storage.blobs import BlobStore, sha256_of
from storage.repos.batch import BatchFacts
from storage.repos.folders import advance_checkpoint
from storage.repos.inserts import RowBuffer
from storage.repos.messages import apply_decision
from storage.repos.quarantine import quarantine_message

Work = list[tuple["IntakeJob", AuthResult | None]]
"""A batch: each job with its edge-computed DKIM/SPF result (or None)."""

Timer = Callable[[str], AbstractContextManager[None]]
"""``timed(stage)``: a context manager recording the stage's duration (metrics)."""


@dataclass(slots=True, kw_only=True)
class IntakeJob:
    """One message on its way through the batcher (mutable: ``failure`` is set on a retry)."""

    message: RawMessage
    prepared: Prepared | None
    failure: str | None
    spool_path: Path | None
    future: asyncio.Future[IntakeResult] = field(repr=False)
    previous_uid: int | None = None
    blobs: tuple[bytes, ...] = ()
    blob_keys: tuple[str, ...] = ()
    queued_at: float = field(default_factory=time.perf_counter)


class BatchBlobs:
    """The ``BlobWriter`` a batch's repositories write through.

    ``put`` of a blob the batch writes itself (``BlobStore.put_many`` on
    the blob thread, before its COMMIT) returns its key without I/O or
    hashing: the very ``bytes`` objects handed to the batch are recognised
    by identity (they stay referenced by its jobs). Any other blob (an
    attachment of a fetched message, a quarantined message's bytes) is
    hashed and kept; ``write_deferred`` stores them all with ONE
    ``BlobStore.put_many`` before the batch returns, so its COMMIT still
    follows every blob its rows name. One durable ``put`` per blob on the
    database thread (write, fsync, rename, directory fsync) was 40 % of that
    thread's time in an IMAP catch-up (py-spy, bench/bench_imap.py --catchup).
    """

    def __init__(self, store: BlobStore, jobs: Sequence[IntakeJob]) -> None:
        self._store = store
        self._keys: dict[int, tuple[bytes, str]] = {
            id(payload): (payload, key)
            for job in jobs
            for payload, key in zip(job.blobs, job.blob_keys, strict=True)
        }
        self._deferred: dict[str, bytes] = {}

    def put(self, data: bytes) -> str:
        known = self._keys.get(id(data))
        if known is not None and known[0] is data:
            return known[1]
        key = sha256_of(data)
        self._deferred.setdefault(key, data)
        return key

    def write_deferred(self) -> None:
        """Store every blob ``put`` deferred, durably (call before the COMMIT).

        Raises:
            OSError: disk full, I/O error (the batch rolls back).
        """
        if self._deferred:
            deferred, self._deferred = self._deferred, {}
            self._store.put_many(list(deferred.values()), list(deferred))


def checkpoint_runs(jobs: Sequence[IntakeJob]) -> list[tuple[IntakeJob, IntakeJob]]:
    """Group a batch's IMAP jobs into UID chains: ``(first, last)`` per run, in order.

    Consecutive jobs of one folder (mailbox, folder, UIDVALIDITY) whose UIDs
    rise, each job's ``previous_uid`` being the UID of the job before it,
    form one run (the watcher's ascending ``UID FETCH`` chain): advancing
    the checkpoint from the first's ``previous_uid`` straight to the last's
    UID ends where advancing it job by job would (each step's condition
    holds once the step before it moved, or the checkpoint was already past
    it), in one UPDATE instead of one per message. A job without a chain
    (``previous_uid`` None or not below its UID) is a run of its own that
    nothing joins; SMTP jobs are skipped.
    """
    runs: list[tuple[IntakeJob, IntakeJob]] = []
    open_run = False
    for job in jobs:
        origin = job.message.provenance
        if not isinstance(origin, ImapOrigin):
            continue
        chained = job.previous_uid is not None and job.previous_uid < origin.uid
        if open_run and chained:
            first, last = runs[-1]
            before = last.message.provenance
            if (
                isinstance(before, ImapOrigin)
                and (before.mailbox_id, before.folder, before.uidvalidity)
                == (origin.mailbox_id, origin.folder, origin.uidvalidity)
                and job.previous_uid == before.uid
            ):
                runs[-1] = (first, job)
                continue
        runs.append((job, job))
        open_run = chained
    return runs


class BatchRunner:
    """Runs one batch in the caller's transaction (see module docstring).

    Args:
        bcc: ``[bcc]`` settings (sync-address domain, aliases, R14/R15 switches).
        backfill_days: ``sync.backfill_days`` (R6).
        contact_initiated: ``providers.*.contact_initiated`` (R2/R3).
        clock: returns the current aware UTC time (the decision's ``now``).
        timed: records how long each stage took.
    """

    def __init__(
        self,
        *,
        bcc: BccSettings,
        backfill_days: int,
        contact_initiated: Mapping[Provider, bool],
        clock: Callable[[], datetime],
        timed: Timer,
    ) -> None:
        self._bcc = bcc
        self._backfill_days = backfill_days
        self._contact_initiated = contact_initiated
        self._clock = clock
        self._timed = timed

    def run(
        self,
        session: Session,
        work: Work,
        quarantine_failures: bool,
        blobs: BatchBlobs,
        published: concurrent.futures.Future[list[str]] | None,
    ) -> tuple[list[IntakeResult], float]:
        """Sync, in the database's transaction: each job in turn; returns (results, end time).

        Raises:
            OSError: publishing the batch's blobs failed (the batch rolls back).
        """
        held = RowBuffer()
        lookups = [
            None if job.prepared is None or quarantine_failures else job.prepared.lookups
            for job, _ in work
        ]
        with self._timed("load_facts"):
            facts = BatchFacts(
                session,
                lookups,
                held=held,
                aliases=self._bcc.aliases,
                bcc_domain=self._bcc.domain,
                contact_initiated=self._contact_initiated,
            )
        results: list[IntakeResult] = []
        for index, (job, auth) in enumerate(work):
            if job.prepared is None or quarantine_failures:
                results.append(self._quarantine(session, job, blobs))
            else:
                results.append(self._store(job.prepared, auth, blobs, facts, index, held))
        for first, last in checkpoint_runs([job for job, _ in work]):
            self._advance(session, first, last)
        with self._timed("apply"):
            held.flush(session)
        with self._timed("blobs_deferred"):
            blobs.write_deferred()
        if published is not None:
            with self._timed("publish_wait"):
                published.result()
        return results, time.perf_counter()

    @staticmethod
    def _advance(session: Session, first: IntakeJob, last: IntakeJob) -> None:
        """Move an IMAP folder checkpoint past a run of jobs, in the batch's transaction."""
        origin = last.message.provenance
        if not isinstance(origin, ImapOrigin):
            return
        previous = first.previous_uid if first.previous_uid is not None else 0
        advance_checkpoint(
            session, origin.mailbox_id, origin.folder, origin.uidvalidity, origin.uid, previous
        )

    def _store(
        self,
        prepared: Prepared,
        auth: AuthResult | None,
        blobs: BatchBlobs,
        batch: BatchFacts,
        index: int,
        held: RowBuffer,
    ) -> IntakeResult:
        origin = prepared.raw.provenance
        with self._timed("load_facts"):
            facts = batch.facts(
                index,
                prepared.lookups,
                settings=RouteSettings(
                    create_contacts=self._bcc.create_contacts,
                    require_dmarc=self._bcc.require_dmarc,
                    backfill_days=self._backfill_days,
                ),
                auth=auth,
                origin=origin if isinstance(origin, ImapOrigin) else None,
            )
        with self._timed("decide"):
            decision = decide(prepared, facts, self._clock())
        with self._timed("apply"):
            pk = apply_decision(batch.session, decision, blobs, held)
            batch.wrote(decision)
        if decision.refusal is not None:
            return IntakeResult(status=IntakeStatus.REFUSED, refusal=decision.refusal)
        if decision.duplicate_of is not None:
            return IntakeResult(status=IntakeStatus.DUPLICATE, message_pk=decision.duplicate_of)
        if pk is None:
            return IntakeResult(status=IntakeStatus.UNROUTED)
        return IntakeResult(status=IntakeStatus.STORED, message_pk=pk)

    def _quarantine(self, session: Session, job: IntakeJob, blobs: BatchBlobs) -> IntakeResult:
        reason = "pipeline failure" if job.prepared is None else "storage failure"
        quarantine_message(session, job.message, reason, job.failure or "", blobs)
        return IntakeResult(status=IntakeStatus.QUARANTINED)

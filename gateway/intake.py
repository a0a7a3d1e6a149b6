"""accept(): the one shell every message goes through (STYLE.md §1).

States of one message::

    received ──spool write, prepare (on the loop ≤ 64 KiB, else one thread hop)──▶ queued
      queued ──batch: BatchFacts → decide → apply_decision (rows held)──▶ flushed
      flushed ──blobs written (fsync, on the blob thread) + COMMIT──▶ committed
      committed ──▶ spool entry deleted, waiter answered

IMAP door (``accept_fetched``): the watcher hands over a fetched message
with its ``ImapOrigin`` and the UID fetched before it; there is no spool
(the IMAP server keeps the message until the checkpoint passes it). The
folder checkpoint is advanced in the SAME transaction as the message rows
(or the quarantine row), never past a message that is not durable.

The batcher groups whatever is queued (up to ``batch_max``) into one
transaction, run by ``Database.run`` as ONE synchronous function (on
SQLite: one hop to the database thread per batch, not per statement):
the facts of all messages are loaded at once (``storage.repos.batch``),
each message is decided and applied in turn (facts an earlier message of
the batch made stale are loaded again, so each sees the rows written for
earlier ones), the rows nothing reads before the end are inserted once per
table, and one COMMIT acknowledges them all (group commit). The batch's
blobs are written and fsynced on the blob thread meanwhile; the COMMIT waits
for them. DKIM/SPF checks (async, DNS) run before the batch enters the
database. If the batch raises, it is rolled back and re-run one message at
a time; a message that fails alone is retried once (an identity race
becomes a duplicate, R12) and then quarantined with its raw bytes and
traceback. The caller answers only after the commit. A crash anywhere
leaves the spool entry, which ``recover`` processes at the next start.

This module does not speak SMTP; ``smtp/listener.py`` maps results to
replies.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import logging
import time
import traceback
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from gateway.config import BccSettings
from gateway.intake_batch import BatchBlobs, BatchRunner, IntakeJob, Work
from gateway.intake_result import IntakeResult
from gateway.observability import Metrics
from gateway.spool import Spool, SpoolCorrupt
from ingest.pipeline import prepare
from ingest.types import (
    AddressKey,
    AuthResult,
    ImapOrigin,
    Prepared,
    Provider,
    RawMessage,
    SmtpEnvelope,
)
from storage.blobs import BlobStore
from storage.db import Database
from storage.repos.facts import CONTACT_INITIATED_DEFAULTS
from storage.repos.messages import resolve_sync_address
from storage.repos.quarantine import source_of

log = logging.getLogger(__name__)

SYNC_ADDRESS_TTL_SECONDS = 60.0
"""How long a sync address found at RCPT is trusted without a new lookup."""

INLINE_RECEIVE_BYTES = 64 * 1024
"""Messages up to this size are received on the event loop itself (see ``_enqueue``)."""

AuthCheck = Callable[[Prepared], Awaitable[AuthResult | None]]


def raw_message(raw: bytes, envelope: SmtpEnvelope | ImapOrigin) -> RawMessage:
    """Build the ``RawMessage`` for bytes received over SMTP or fetched over IMAP."""
    return RawMessage(raw=raw, provenance=envelope, sha256=hashlib.sha256(raw).hexdigest())


def _utc_now() -> datetime:
    return datetime.now(UTC)


class Intake:
    """Owns the spool, the prepare step and the group-commit batcher loop."""

    def __init__(
        self,
        *,
        db: Database,
        blobs: BlobStore,
        spool: Spool,
        bcc: BccSettings,
        metrics: Metrics,
        auth_check: AuthCheck | None = None,
        clock: Callable[[], datetime] = _utc_now,
        batch_max: int = 64,
        backfill_days: int = 0,
        contact_initiated: Mapping[Provider, bool] = CONTACT_INITIATED_DEFAULTS,
    ) -> None:
        """Wire the intake; call ``run`` as a task, then ``accept``.

        ``backfill_days`` (``sync.backfill_days``, R6) and ``contact_initiated``
        (``providers.*.contact_initiated``, R2/R3) only matter for the IMAP door.
        """
        self._db = db
        self._blobs = blobs
        self._spool = spool
        self._bcc = bcc
        self._metrics = metrics
        self._auth_check = auth_check
        self._clock = clock
        self._batch_max = batch_max
        self._backfill_days = backfill_days
        self._contact_initiated = dict(contact_initiated)
        self._queue: asyncio.Queue[IntakeJob | None] = asyncio.Queue()
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._known: dict[str, tuple[float, frozenset[AddressKey]]] = {}
        self._runner = BatchRunner(
            bcc=bcc,
            backfill_days=backfill_days,
            contact_initiated=self._contact_initiated,
            clock=clock,
            timed=self._timed,
        )
        self._publisher = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="mailgate-blobs"
        )

    async def accept(self, raw: bytes, envelope: SmtpEnvelope) -> IntakeResult:
        """Spool, process and commit one SMTP message; return after the commit.

        Raises:
            OSError: the spool write failed (nothing acknowledged).
            Exception: the database failed even for the quarantine row; the
                spool entry stays and is processed at the next start.
        """
        self._enter()
        try:
            future = await self._enqueue(raw, envelope, spool=True)
            # Shielded: a client that hangs up must not cancel the job's future.
            return await asyncio.shield(future)
        finally:
            self._leave()

    async def accept_fetched(
        self, raw: bytes, origin: ImapOrigin, *, previous_uid: int | None = None
    ) -> IntakeResult:
        """Process and commit one IMAP-fetched message; return after the commit.

        The folder checkpoint of (``origin.mailbox_id``, ``origin.folder``)
        moves to ``origin.uid`` in the same transaction as the message's rows
        (or its quarantine row), and only when it already stood at or past
        ``previous_uid`` (``storage.repos.folders.advance_checkpoint``).

        Args:
            raw: the message bytes exactly as fetched (BODY.PEEK[]).
            origin: mailbox, folder, role, UIDVALIDITY, UID, INTERNALDATE.
            previous_uid: the UID fetched just before this one in the same
                UID FETCH chain, or the checkpoint the chain started from;
                None skips the chain check (the checkpoint only moves up).

        Raises:
            Exception: the database failed even for the quarantine row; the
                checkpoint did not move, so the watcher fetches it again.
        """
        results = await self.accept_fetched_many(((raw, origin),), previous_uid=previous_uid)
        return results[0]

    async def accept_fetched_many(
        self, messages: Sequence[tuple[bytes, ImapOrigin]], *, previous_uid: int | None = None
    ) -> list[IntakeResult]:
        """``accept_fetched`` for a UID chain of one folder, queued in order so they batch.

        Args:
            messages: ``(raw, origin)`` in ascending UID order of one folder.
            previous_uid: the checkpoint the chain starts from (see ``accept_fetched``).

        Returns:
            One result per message, in order, each known after its commit.

        Raises:
            Exception: as ``accept_fetched``; the first failure is raised
                after every message of the chain has been settled.
        """
        self._enter()
        try:
            futures: list[asyncio.Future[IntakeResult]] = []
            previous = previous_uid
            for raw, origin in messages:
                futures.append(await self._enqueue(raw, origin, previous_uid=previous))
                previous = origin.uid
            settled = await asyncio.gather(
                *(asyncio.shield(f) for f in futures), return_exceptions=True
            )
        finally:
            self._leave()
        for item in settled:
            if isinstance(item, BaseException):
                raise item
        return [r for r in settled if isinstance(r, IntakeResult)]

    async def is_sync_address(self, address: str) -> bool:
        """Return whether ``address`` (lower-cased addr-spec) has a membership (RCPT).

        Positive answers are cached for ``SYNC_ADDRESS_TTL_SECONDS``: on SQLite
        every lookup queues on the one database thread behind the batch being
        committed, so a lookup per RCPT would stall the SMTP sessions.
        Memberships are never reused for another user, so a stale positive
        answer only lets a message in that ``load_facts`` then routes with
        the current rows.
        """
        now = time.monotonic()
        expires, _ = self._known.get(address, (0.0, frozenset()))
        if expires > now:
            return True
        target = await self._db.read(resolve_sync_address, address, self._bcc.domain)
        if target is not None and target.sync_address == address:
            self._known[address] = (now + SYNC_ADDRESS_TTL_SECONDS, target.sender_keys)
            return True
        return False

    def _sender_is_known_user(self, prepared: Prepared) -> bool:
        """Whether R15 will most likely accept: From is the RCPT-checked user's address.

        Only a hint (the cache may be stale): it decides whether blobs are
        written ahead of the batch, never whether the message is accepted.
        """
        envelope = prepared.raw.provenance
        senders = prepared.parsed.participants.from_
        if not isinstance(envelope, SmtpEnvelope) or len(senders) != 1:
            return False
        key = senders[0].address_key
        return any(
            key in self._known.get(rcpt, (0.0, frozenset()))[1]
            for rcpt in envelope.envelope_recipients
        )

    def _blobs_of(self, prepared: Prepared) -> tuple[tuple[bytes, ...], tuple[str, ...]]:
        """The payloads the batch writes itself, and their keys (no I/O, no hashing).

        The batch writes them on the blob thread with ``BlobStore.put_many``
        (written and made durable together) while the database thread runs
        its statements, and COMMITs only after that (``_commit``); the keys
        come from the parser. Before, every blob cost two fsyncs in the
        shared worker pool inside the SMTP round trip.

        SMTP: the raw message and its attachments, only when R15 will most
        likely pass, so refused mail usually leaves nothing behind. IMAP:
        the raw message only — it is kept even when routing skips the
        message (R2/R3: nothing received is lost), unless it is a duplicate,
        whose bytes are usually stored already. Any other blob a decision
        needs goes through ``BatchBlobs`` (deferred, one ``put_many`` before
        COMMIT). A rolled-back batch leaves a harmless orphan (same bytes,
        same name).
        """
        raw = prepared.raw
        if isinstance(raw.provenance, ImapOrigin):
            return (raw.raw,), (raw.sha256,)
        if not self._sender_is_known_user(prepared):
            return (), ()
        attachments = prepared.parsed.attachments
        return (
            (raw.raw, *(a.payload for a in attachments)),
            (raw.sha256, *(a.sha256 for a in attachments)),
        )

    async def recover(self) -> int:
        """Process every spool entry left by a previous run; return how many.

        Call after ``run`` has started and before the listener accepts mail
        or anything else stores blobs: it also removes blob temporary files
        a crashed process staged (never referenced by a committed row).
        """
        discarded = await asyncio.to_thread(self._blobs.discard_staged)
        if discarded:
            log.info("staged blobs discarded", extra={"count": discarded})
        paths = await asyncio.to_thread(self._spool.pending)
        for path in paths:
            try:
                entry = await asyncio.to_thread(self._spool.read, path)
            except SpoolCorrupt:
                log.error("spool entry unreadable", extra={"path": str(path)}, exc_info=True)
                await asyncio.to_thread(self._spool.set_aside, path)
                continue
            await asyncio.shield(await self._enqueue(entry.raw, entry.envelope, spool_path=path))
        if paths:
            log.info("spool recovered", extra={"count": len(paths)})
        return len(paths)

    async def run(self) -> None:
        """Batcher loop: group queued jobs, commit, answer; ends after ``close``."""
        try:
            await self._batches()
        finally:
            # Let the last spool removals finish.
            await asyncio.to_thread(self._publisher.shutdown, True)

    async def _batches(self) -> None:
        while True:
            job = await self._queue.get()
            if job is None:
                return
            batch = [job]
            while len(batch) < self._batch_max and not self._queue.empty():
                nxt = self._queue.get_nowait()
                if nxt is None:
                    await self._process(batch)
                    return
                batch.append(nxt)
            await self._process(batch)

    async def close(self) -> None:
        """Wait for in-flight ``accept`` calls, then stop the batcher after its queue."""
        await self._idle.wait()
        await self._queue.put(None)

    def _enter(self) -> None:
        self._in_flight += 1
        self._idle.clear()

    def _leave(self) -> None:
        self._in_flight -= 1
        if self._in_flight == 0:
            self._idle.set()

    async def _enqueue(
        self,
        raw: bytes,
        provenance: SmtpEnvelope | ImapOrigin,
        *,
        spool: bool = False,
        spool_path: Path | None = None,
        previous_uid: int | None = None,
    ) -> asyncio.Future[IntakeResult]:
        """Receive one message (spool, hash, prepare: ``_receive``), then queue it for the batcher.

        A message up to ``INLINE_RECEIVE_BYTES`` is received on the event
        loop itself (≈0.3–0.6 ms of work); a larger one in ONE worker-thread
        hop. Every hop waits for the GIL behind the event loop and the
        database thread: one hop cost 7–10 ms of waiting per message under
        bench/bench_smtp.py (three hops 20 ms). ``prepare`` is pure, so any
        thread may run it.

        Raises:
            OSError: the spool write failed (nothing queued).
        """
        future: asyncio.Future[IntakeResult] = asyncio.get_running_loop().create_future()
        with self._timed("receive"):
            if len(raw) <= INLINE_RECEIVE_BYTES:
                job = self._receive(raw, provenance, future, spool, spool_path, previous_uid)
            else:
                job = await asyncio.to_thread(
                    self._receive, raw, provenance, future, spool, spool_path, previous_uid
                )
        await self._queue.put(job)
        return future

    def _receive(
        self,
        raw: bytes,
        provenance: SmtpEnvelope | ImapOrigin,
        future: asyncio.Future[IntakeResult],
        spool: bool,
        spool_path: Path | None,
        previous_uid: int | None,
    ) -> IntakeJob:
        """Sync (on the loop, or a worker thread for a large message): spool, hash, prepare."""
        message = raw_message(raw, provenance)
        if spool and isinstance(provenance, SmtpEnvelope):
            spool_path = self._spool.write(raw, provenance, message.sha256)
        prepared, failure = self._prepare(message)
        payloads, keys = self._blobs_of(prepared) if prepared is not None else ((), ())
        return IntakeJob(
            message=message,
            prepared=prepared,
            failure=failure,
            spool_path=spool_path,
            future=future,
            previous_uid=previous_uid,
            blobs=payloads,
            blob_keys=keys,
        )

    def _prepare(self, message: RawMessage) -> tuple[Prepared | None, str | None]:
        try:
            with self._timed("prepare"):
                return prepare(message), None
        except Exception:  # the pipeline promises not to raise; if it does, quarantine
            log.warning("prepare failed", extra={"size_bytes": len(message.raw)}, exc_info=True)
            return None, traceback.format_exc()

    @contextmanager
    def _timed(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self._metrics.stage_seconds.labels(stage=stage).observe(time.perf_counter() - start)

    async def _process(self, batch: list[IntakeJob]) -> None:
        started = time.perf_counter()
        for job in batch:
            self._metrics.stage_seconds.labels(stage="queued").observe(started - job.queued_at)
        results: list[IntakeResult] | None
        try:
            results = await self._commit(batch, quarantine_failures=False)
        except Exception:
            if len(batch) > 1:
                log.warning("batch rolled back", extra={"batch_size": len(batch)}, exc_info=True)
                for job in batch:
                    await self._process([job])
                return
            results = await self._single(batch[0])
            if results is None:
                return
        self._finish(batch, results)

    async def _single(self, job: IntakeJob) -> list[IntakeResult] | None:
        """Retry one job (identity race → duplicate), then quarantine it."""
        try:
            return await self._commit([job], quarantine_failures=False)
        except Exception:
            job.failure = traceback.format_exc()
            log.warning(
                "message quarantined",
                extra={"size_bytes": len(job.message.raw)},
                exc_info=True,
            )
        try:
            return await self._commit([job], quarantine_failures=True)
        except Exception as exc:
            log.error("quarantine failed", exc_info=True)
            if not job.future.done():
                job.future.set_exception(exc)
            return None

    async def _commit(
        self, batch: list[IntakeJob], *, quarantine_failures: bool
    ) -> list[IntakeResult]:
        """Run the batch in one transaction (one ``Database.run``); results after COMMIT.

        The batch's blobs are written (``BlobStore.put_many``) on the blob
        thread while the statements run; the transaction waits for that before its COMMIT
        (on PostgreSQL, whose statements run on the event loop, before the
        transaction starts), so no committed row names a blob that is not
        durable.
        """
        work: Work = []
        for job in batch:
            auth = None
            if (
                self._auth_check is not None
                and job.prepared is not None
                and isinstance(job.message.provenance, SmtpEnvelope)
                and not quarantine_failures
            ):
                auth = await self._auth_check(job.prepared)
            work.append((job, auth))
        payloads = [payload for job in batch for payload in job.blobs]
        keys = [key for job in batch for key in job.blob_keys]
        published = (
            self._publisher.submit(self._blobs.put_many, payloads, keys) if payloads else None
        )
        if published is not None and not self._db.runs_in_thread:
            await asyncio.wrap_future(published)
        blobs = BatchBlobs(self._blobs, batch)
        results, done_at = await self._db.run(
            self._runner.run, work, quarantine_failures, blobs, published
        )
        # The DB thread's COMMIT (and the hop back to the loop) follow ``done_at``.
        elapsed = time.perf_counter() - done_at
        self._metrics.stage_seconds.labels(stage="commit").observe(elapsed)
        return results

    def _finish(self, batch: list[IntakeJob], results: list[IntakeResult]) -> None:
        paths = tuple(job.spool_path for job in batch if job.spool_path is not None)
        if paths:
            # Off the event loop: an unlink waits for the filesystem journal, which
            # the batches' fsyncs keep busy. A lost unlink only means a duplicate.
            self._publisher.submit(self._remove_spooled, paths)
        for job, result in zip(batch, results, strict=True):
            self._count(job, result)
            self._log(job, result)
            if not job.future.done():
                job.future.set_result(result)

    def _remove_spooled(self, paths: tuple[Path, ...]) -> None:
        try:
            self._spool.remove(paths)
        except OSError:
            log.warning("spool entries not removed", extra={"count": len(paths)}, exc_info=True)

    def _log(self, job: IntakeJob, result: IntakeResult) -> None:
        fields: dict[str, object] = {
            "size_bytes": len(job.message.raw),
            "message_pk": result.message_pk,
        }
        if job.prepared is not None:
            fields["message_id"] = job.prepared.parsed.message_id
        if result.refusal is not None:
            fields.update(rule=result.refusal.rule, reason=result.refusal.reason)
        log.info(f"message {result.status.value}", extra=fields)

    def _count(self, job: IntakeJob, result: IntakeResult) -> None:
        source = source_of(job.message.provenance).value
        if result.refusal is not None:
            self._metrics.refused.labels(source=source, rule=result.refusal.rule).inc()
        else:
            self._metrics.accepted.labels(source=source).inc()

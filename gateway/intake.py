"""accept(): the one shell every message goes through (STYLE.md §1).

States of one message::

    received ──spool write (fsync)──▶ spooled ──prepare──▶ queued
      queued ──batch: load_facts → decide → apply_decision──▶ flushed
      flushed ──COMMIT──▶ committed ──▶ spool entry deleted, waiter answered

The batcher groups whatever is queued (up to ``batch_max``) into one
transaction: each message is processed in turn, so ``load_facts`` sees the
rows flushed for earlier ones, and one COMMIT acknowledges them all (group
commit). If the batch raises, it is rolled back and re-run one message at a
time; a message that fails alone is retried once (an identity race
becomes a duplicate, R12) and then quarantined with its raw bytes and
traceback. The caller answers only after the commit. A crash anywhere
leaves the spool entry, which ``recover`` processes at the next start.

This module does not speak SMTP; ``smtp/listener.py`` maps results to
replies.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import traceback
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from gateway.config import BccSettings
from gateway.intake_result import IntakeResult, IntakeStatus
from gateway.observability import Metrics
from gateway.spool import Spool, SpoolCorrupt
from ingest.pipeline import decide, prepare
from ingest.types import (
    AuthResult,
    Lookups,
    Prepared,
    RawMessage,
    RouteSettings,
    SmtpEnvelope,
    Source,
)
from storage.blobs import BlobStore
from storage.repos.messages import apply_decision, load_facts
from storage.repos.quarantine import quarantine_message

log = logging.getLogger(__name__)

THREAD_PREPARE_BYTES = 64 * 1024
"""Messages at least this big are parsed in a worker thread (STYLE.md §8)."""

SYNC_ADDRESS_TTL_SECONDS = 60.0
"""How long a sync address found at RCPT is trusted without a new lookup."""

AuthCheck = Callable[[Prepared], Awaitable[AuthResult | None]]


@dataclass(slots=True, kw_only=True)
class _Job:
    message: RawMessage
    prepared: Prepared | None
    failure: str | None
    spool_path: Path | None
    future: asyncio.Future[IntakeResult] = field(repr=False)


def raw_message(raw: bytes, envelope: SmtpEnvelope) -> RawMessage:
    """Build the ``RawMessage`` for bytes received over SMTP."""
    return RawMessage(raw=raw, provenance=envelope, sha256=hashlib.sha256(raw).hexdigest())


def _utc_now() -> datetime:
    return datetime.now(UTC)


class Intake:
    """Owns the spool, the prepare step and the group-commit batcher loop."""

    def __init__(
        self,
        *,
        session_factory: async_sessionmaker[AsyncSession],
        blobs: BlobStore,
        spool: Spool,
        bcc: BccSettings,
        metrics: Metrics,
        auth_check: AuthCheck | None = None,
        clock: Callable[[], datetime] = _utc_now,
        batch_max: int = 64,
    ) -> None:
        """Wire the intake; call ``run`` as a task, then ``accept``."""
        self._sessions = session_factory
        self._blobs = blobs
        self._spool = spool
        self._bcc = bcc
        self._metrics = metrics
        self._auth_check = auth_check
        self._clock = clock
        self._batch_max = batch_max
        self._queue: asyncio.Queue[_Job | None] = asyncio.Queue()
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._known: dict[str, float] = {}

    async def accept(self, raw: bytes, envelope: SmtpEnvelope) -> IntakeResult:
        """Spool, process and commit one SMTP message; return after the commit.

        Raises:
            OSError: the spool write failed (nothing acknowledged).
            Exception: the database failed even for the quarantine row; the
                spool entry stays and is processed at the next start.
        """
        self._enter()
        try:
            path = await asyncio.to_thread(self._spool.write, raw, envelope)
            return await self._submit(raw_message(raw, envelope), path)
        finally:
            self._leave()

    async def is_sync_address(self, address: str) -> bool:
        """Return whether ``address`` (lower-cased addr-spec) has a membership (RCPT).

        Positive answers are cached for ``SYNC_ADDRESS_TTL_SECONDS``: on SQLite
        every transaction takes the write lock, so a lookup per RCPT would
        queue behind (and stall) the batcher. Memberships are never reused
        for another user, so a stale positive answer only lets a message in
        that ``load_facts`` then routes with the current rows.
        """
        now = time.monotonic()
        if self._known.get(address, 0.0) > now:
            return True
        if await self._lookup_sync_address(address):
            self._known[address] = now + SYNC_ADDRESS_TTL_SECONDS
            return True
        return False

    async def _lookup_sync_address(self, address: str) -> bool:
        lookups = Lookups(
            address_keys=frozenset(),
            own_message_id=None,
            message_ids=frozenset(),
            identity_key="",
            sync_addresses=frozenset({address}),
        )
        async with self._sessions() as session:
            facts = await load_facts(
                session,
                lookups,
                bcc_domain=self._bcc.domain,
                aliases=self._bcc.aliases,
                settings=RouteSettings(),
                auth=None,
            )
        return any(target.sync_address == address for target in facts.sync_targets)

    async def recover(self) -> int:
        """Process every spool entry left by a previous run; return how many.

        Call after ``run`` has started and before the listener accepts mail.
        """
        paths = await asyncio.to_thread(self._spool.pending)
        for path in paths:
            try:
                entry = await asyncio.to_thread(self._spool.read, path)
            except SpoolCorrupt:
                log.error("spool entry unreadable", extra={"path": str(path)}, exc_info=True)
                await asyncio.to_thread(self._spool.set_aside, path)
                continue
            await self._submit(raw_message(entry.raw, entry.envelope), path)
        if paths:
            log.info("spool recovered", extra={"count": len(paths)})
        return len(paths)

    async def run(self) -> None:
        """Batcher loop: group queued jobs, commit, answer; ends after ``close``."""
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

    async def _submit(self, message: RawMessage, path: Path | None) -> IntakeResult:
        prepared, failure = await self._prepare(message)
        future: asyncio.Future[IntakeResult] = asyncio.get_running_loop().create_future()
        await self._queue.put(
            _Job(
                message=message,
                prepared=prepared,
                failure=failure,
                spool_path=path,
                future=future,
            )
        )
        # Shielded: a client that hangs up must not cancel the job's future.
        return await asyncio.shield(future)

    async def _prepare(self, message: RawMessage) -> tuple[Prepared | None, str | None]:
        try:
            with self._timed("prepare"):
                if len(message.raw) >= THREAD_PREPARE_BYTES:
                    return await asyncio.to_thread(prepare, message), None
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

    async def _process(self, batch: list[_Job]) -> None:
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

    async def _single(self, job: _Job) -> list[IntakeResult] | None:
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

    async def _commit(self, batch: list[_Job], *, quarantine_failures: bool) -> list[IntakeResult]:
        results: list[IntakeResult] = []
        async with self._sessions() as session:
            try:
                for job in batch:
                    if job.prepared is None or quarantine_failures:
                        results.append(await self._quarantine(session, job))
                    else:
                        results.append(await self._store(session, job.prepared))
                with self._timed("commit"):
                    await session.commit()
            except BaseException:
                await session.rollback()
                raise
        return results

    async def _store(self, session: AsyncSession, prepared: Prepared) -> IntakeResult:
        auth = await self._auth_check(prepared) if self._auth_check else None
        with self._timed("load_facts"):
            facts = await load_facts(
                session,
                prepared.lookups,
                bcc_domain=self._bcc.domain,
                aliases=self._bcc.aliases,
                settings=RouteSettings(
                    create_contacts=self._bcc.create_contacts,
                    require_dmarc=self._bcc.require_dmarc,
                ),
                auth=auth,
            )
        with self._timed("decide"):
            decision = decide(prepared, facts, self._clock())
        with self._timed("apply"):
            pk = await apply_decision(session, decision, self._blobs)
        if decision.refusal is not None:
            return IntakeResult(status=IntakeStatus.REFUSED, refusal=decision.refusal)
        if decision.duplicate_of is not None:
            return IntakeResult(status=IntakeStatus.DUPLICATE, message_pk=decision.duplicate_of)
        if pk is None:
            return IntakeResult(status=IntakeStatus.UNROUTED)
        return IntakeResult(status=IntakeStatus.STORED, message_pk=pk)

    async def _quarantine(self, session: AsyncSession, job: _Job) -> IntakeResult:
        reason = "pipeline failure" if job.prepared is None else "storage failure"
        await quarantine_message(session, job.message, reason, job.failure or "", self._blobs)
        return IntakeResult(status=IntakeStatus.QUARANTINED)

    def _finish(self, batch: list[_Job], results: list[IntakeResult]) -> None:
        paths = tuple(job.spool_path for job in batch if job.spool_path is not None)
        self._spool.remove(paths)  # unlink is cheap; a lost unlink only means a duplicate
        for job, result in zip(batch, results, strict=True):
            self._count(result)
            self._log(job, result)
            if not job.future.done():
                job.future.set_result(result)

    def _log(self, job: _Job, result: IntakeResult) -> None:
        fields: dict[str, object] = {
            "size_bytes": len(job.message.raw),
            "message_pk": result.message_pk,
        }
        if job.prepared is not None:
            fields["message_id"] = job.prepared.parsed.message_id
        if result.refusal is not None:
            fields.update(rule=result.refusal.rule, reason=result.refusal.reason)
        log.info(f"message {result.status.value}", extra=fields)

    def _count(self, result: IntakeResult) -> None:
        source = Source.BCC.value
        if result.refusal is not None:
            self._metrics.refused.labels(source=source, rule=result.refusal.rule).inc()
        else:
            self._metrics.accepted.labels(source=source).inc()

"""Process wiring for ``mailgate serve``: build from Settings, start, drain, stop.

Start order::

    database (schema check / embedded upgrade) → spool → intake batcher
      → recover leftover spool entries → reconcile sends left in `sending`
      → SMTP listener → IMAP watchers of every connected mailbox
      → scheduler (token refresh R22, outbound retries, webhooks)
      → HTTP server (API, OAuth callback, settings page) → ready

Stop order on SIGTERM/SIGINT (STYLE.md §8): stop accepting SMTP
connections and let transactions in DATA finish (421 to the rest) → IMAP
IDLE DONE + LOGOUT → finish in-flight ``accept()`` calls (the batcher
commits what is queued) → stop the scheduler → stop HTTP → close the
database. Every task lives in one ``TaskGroup`` and is named.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
import signal
from collections.abc import Iterator
from dataclasses import dataclass

import sqlalchemy as sa
import uvicorn
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from sqlalchemy.orm import Session

from gateway.auth_check import SenderAuthenticator
from gateway.config import Settings
from gateway.http.app import build_http_app
from gateway.http.auth import ApiKeys
from gateway.http.context import HttpContext
from gateway.imap.supervisor import ImapSupervisor, contact_initiated_of
from gateway.intake import Intake
from gateway.jobs import schedule_outbound, schedule_token_refresh
from gateway.mailboxes import MailboxService
from gateway.observability import Metrics
from gateway.outbound import OutboundService
from gateway.smtp.listener import BccHandler, SmtpListener, start_smtp
from gateway.spool import Spool
from gateway.webhooks import WebhookSender
from storage.blobs import BlobStore
from storage.db import Database
from storage.migrate import schema_status, upgrade

log = logging.getLogger(__name__)


class SchemaOutOfDate(RuntimeError):
    """The database schema is behind the code; ``mailgate db upgrade`` fixes it."""

    def __init__(self, current: str | None, head: str) -> None:
        super().__init__(
            f"database schema is at {current or 'nothing'}, code needs {head}: "
            "run `mailgate db upgrade`"
        )


def is_embedded(settings: Settings) -> bool:
    """Return whether the database is the embedded SQLite file (upgraded automatically)."""
    return settings.storage.database_url.startswith("sqlite")


async def ensure_schema(db: Database, settings: Settings) -> None:
    """Upgrade the embedded SQLite schema, or check PostgreSQL's is current.

    Raises:
        SchemaOutOfDate: a server database needs ``mailgate db upgrade``.
    """
    current, head = await schema_status(db)
    if current == head:
        return
    if not is_embedded(settings):
        raise SchemaOutOfDate(current, head)
    log.info("upgrading embedded database schema", extra={"reason": f"{current} -> {head}"})
    await asyncio.to_thread(upgrade, settings.storage.database_url)


class _Uvicorn(uvicorn.Server):
    """uvicorn without its own signal handling: ``serve`` owns SIGTERM/SIGINT."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@dataclass(slots=True)
class _Running:
    smtp: SmtpListener | None = None


async def serve(settings: Settings) -> None:
    """Run the gateway until SIGTERM/SIGINT; return after a clean stop.

    Raises:
        SchemaOutOfDate: the database must be upgraded first.
        OSError: a port is in use or the data directory is not writable.
    """
    raise_open_files_limit()
    db = Database(settings.storage.database_url)
    try:
        await ensure_schema(db, settings)
        await _serve(settings, db)
    finally:
        await db.close()
        log.info("stopped")


def raise_open_files_limit() -> int:
    """Raise this process's soft open-files limit to its hard limit; return the new soft limit.

    Every watched folder holds one IMAP connection (two per mailbox: INBOX
    and Sent), so 1,000 mailboxes need ~2,000 descriptors beside the SMTP
    and HTTP clients, while the usual soft default is 1,024. The hard limit
    is the administrator's (systemd ``LimitNOFILE=``, docs/operations.md);
    this only claims it. Follows POSIX getrlimit/setrlimit (RLIMIT_NOFILE).
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            log.warning(
                "open-files limit not raised",
                extra={"open_files_soft": soft, "open_files_hard": hard},
            )
    log.info("open-files limit", extra={"open_files_soft": soft, "open_files_hard": hard})
    return soft


def ping(session: Session) -> None:
    """Run ``SELECT 1`` (readiness: the database answers)."""
    session.execute(sa.text("SELECT 1"))


async def _serve(settings: Settings, db: Database) -> None:
    data_dir = settings.storage.data_dir
    spool = Spool(data_dir / "spool")
    await asyncio.to_thread(spool.open)
    metrics = Metrics()
    blobs = BlobStore(data_dir / "blobs")
    intake = Intake(
        db=db,
        blobs=blobs,
        spool=spool,
        bcc=settings.bcc,
        metrics=metrics,
        auth_check=SenderAuthenticator(settings.bcc.dns_server)
        if settings.bcc.require_dmarc
        else None,
        contact_initiated=contact_initiated_of(settings),
        backfill_days=settings.sync.backfill_days,
    )
    running = _Running()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    async def ready_check() -> tuple[bool, str]:
        if running.smtp is None or not running.smtp.is_serving():
            return False, "smtp listener not serving"
        try:
            await db.read(ping)
        except Exception:  # any failure means "not ready"; logged for the operator
            log.warning("database unreachable", exc_info=True)
            return False, "database unreachable"
        return True, ""

    service = MailboxService(db, settings)
    outbound = OutboundService(db, settings, service, blobs)
    imap = ImapSupervisor(settings, db, service, intake, metrics=metrics)
    context = HttpContext(
        db=db,
        settings=settings,
        service=service,
        keys=ApiKeys(settings.http.api_keys),
        outbound=outbound,
    )
    http_app = build_http_app(metrics=metrics, ready_check=ready_check, context=context)
    scheduler = AsyncIOScheduler()
    schedule_token_refresh(scheduler, service)
    schedule_outbound(scheduler, outbound, WebhookSender(db, settings))
    http = _Uvicorn(
        uvicorn.Config(
            http_app,
            host=settings.http.host,
            port=settings.http.port,
            log_config=None,
            lifespan="off",
            access_log=False,
        )
    )
    handler = BccHandler(
        domain=settings.bcc.domain, is_sync_address=intake.is_sync_address, accept=intake.accept
    )
    async with asyncio.TaskGroup() as group:
        intake_task = group.create_task(intake.run(), name="intake")
        await intake.recover()
        await outbound.reconcile()  # sends a crash left in `sending` (docs/sending.md)
        running.smtp = await start_smtp(
            handler,
            settings.smtp,
            on_rejection=lambda code: metrics.smtp_rejections.labels(code=code).inc(),
        )
        await imap.start()  # one watcher per (account, folder) of every connected mailbox
        scheduler.start()
        http_task = group.create_task(http.serve(), name="http")
        for sock in running.smtp.sockets:
            host, port = sock.getsockname()[:2]
            log.info("smtp listening", extra={"host": host, "port": port})
        await stop.wait()
        log.info("stopping")
        await running.smtp.drain()  # no new mail; DATA in flight finishes; 421 to the rest
        await imap.stop()  # IDLE DONE + LOGOUT; fetches in flight reach the intake first
        await intake.close()
        await intake_task
        scheduler.shutdown(wait=False)
        http.should_exit = True
        await http_task

"""Scheduled jobs on APScheduler: token refresh (R22), outbound retries, webhook deliveries.

Edge module: the job function takes the service and an injected clock, so
tests run it without a scheduler; ``schedule_token_refresh`` adds it to an
``AsyncIOScheduler`` owned by ``gateway/app.py``. One mailbox's failure
never stops the others.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from apscheduler.schedulers.asyncio import AsyncIOScheduler

from gateway.mailboxes import REAUTH_REQUIRED, MailboxError, MailboxService
from gateway.outbound import OutboundService
from gateway.webhooks import WebhookSender
from ingest.types import MailboxId

log = logging.getLogger(__name__)

TOKEN_REFRESH_JOB_ID = "oauth-token-refresh"  # noqa: S105 (a job name)
TOKEN_REFRESH_INTERVAL_SECONDS = 60
"""How often the job looks for tokens about to expire (well under ``refresh_ahead_seconds``)."""

OUTBOUND_JOB_ID = "outbound-queue"
OUTBOUND_INTERVAL_SECONDS = 10
"""How often queued and retry-due CRM sends are picked up (docs/sending.md)."""

WEBHOOK_JOB_ID = "webhook-deliveries"
WEBHOOK_INTERVAL_SECONDS = 15
"""How often due webhook deliveries are sent."""


@dataclass(frozen=True, slots=True, kw_only=True)
class RefreshReport:
    """What one run did: mailbox ids by outcome, each in refresh order."""

    refreshed: tuple[MailboxId, ...]
    reauth_required: tuple[MailboxId, ...]
    failed: tuple[MailboxId, ...]


def _utcnow() -> datetime:
    return datetime.now(UTC)


async def refresh_expiring_tokens(
    service: MailboxService, *, clock: Callable[[], datetime] = _utcnow
) -> RefreshReport:
    """Refresh every connected mailbox's access token that expires within ``refresh_ahead_seconds``.

    Transient and permanent provider errors leave the mailbox as it was (the
    next run or the next login tries again); ``invalid_grant`` moves it to
    ``reauth_required`` (done by the service).
    """
    refreshed: list[MailboxId] = []
    reauth: list[MailboxId] = []
    failed: list[MailboxId] = []
    for mailbox_id in await service.refresh_due(clock()):
        try:
            await service.refresh(mailbox_id)
        except MailboxError as exc:
            (reauth if exc.code == REAUTH_REQUIRED else failed).append(mailbox_id)
            if exc.code != REAUTH_REQUIRED:
                log.warning(
                    "token refresh failed", extra={"mailbox_id": mailbox_id, "reason": exc.code}
                )
        else:
            refreshed.append(mailbox_id)
    return RefreshReport(
        refreshed=tuple(refreshed), reauth_required=tuple(reauth), failed=tuple(failed)
    )


def schedule_token_refresh(
    scheduler: AsyncIOScheduler,
    service: MailboxService,
    *,
    interval_seconds: int = TOKEN_REFRESH_INTERVAL_SECONDS,
) -> None:
    """Add the refresh job (interval trigger, one instance at a time, late runs coalesced)."""
    scheduler.add_job(
        refresh_expiring_tokens,
        "interval",
        seconds=interval_seconds,
        args=(service,),
        id=TOKEN_REFRESH_JOB_ID,
        replace_existing=True,
        max_instances=1,
        coalesce=True,
    )


def schedule_outbound(
    scheduler: AsyncIOScheduler, outbound: OutboundService, webhooks: WebhookSender
) -> None:
    """Add the outbound-queue and webhook jobs (one instance each, late runs coalesced)."""
    for job_id, func, seconds in (
        (OUTBOUND_JOB_ID, outbound.process_due, OUTBOUND_INTERVAL_SECONDS),
        (WEBHOOK_JOB_ID, webhooks.deliver_due, WEBHOOK_INTERVAL_SECONDS),
    ):
        scheduler.add_job(
            func,
            "interval",
            seconds=seconds,
            id=job_id,
            replace_existing=True,
            max_instances=1,
            coalesce=True,
        )

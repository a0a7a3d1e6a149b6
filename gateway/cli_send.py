"""``mailgate send``: a CRM send from the command line (INTERFACE.md; R1, R16, R17).

Thin: parse arguments, call ``gateway.outbound.OutboundService.send``, print
the outbound id, Message-ID and state (``--json``: one JSON document). Exit 1
when the send failed (the row is kept as ``failed``, R17).
"""

from __future__ import annotations

import asyncio
import mimetypes
from pathlib import Path
from typing import Any

import click

from gateway.cli_common import cli_settings, common_options, emit, fail, to_jsonable
from gateway.config import Settings
from gateway.outbound import SendRejected, SendRequest
from ingest.compose import OutgoingAttachment
from ingest.types import MessageId
from storage.models.enums import OutboundKind, OutboundState


def _attachment(path: str) -> OutgoingAttachment:
    file = Path(path)
    content_type = mimetypes.guess_type(file.name)[0] or "application/octet-stream"
    return OutgoingAttachment(
        filename=file.name, content_type=content_type, payload=file.read_bytes()
    )


async def _send(settings: Settings, request: SendRequest) -> Any:
    from gateway.mailboxes import MailboxService
    from gateway.outbound import OutboundService
    from storage.blobs import BlobStore
    from storage.db import Database, is_sqlite
    from storage.migrate import schema_status, upgrade

    url = settings.storage.database_url
    db = Database(url)
    try:
        current, head = await schema_status(db)
        if current != head:
            if not is_sqlite(url):
                raise click.ClickException("database schema out of date: run `mailgate db upgrade`")
            await asyncio.to_thread(upgrade, url)
        blobs = BlobStore(Path(settings.storage.data_dir) / "blobs")
        service = OutboundService(db, settings, MailboxService(db, settings), blobs)
        return await service.send(request)
    finally:
        await db.close()


@click.command("send")
@click.option("--user", "user", required=True, help="The CRM user's email.")
@click.option("--subaccount", required=True)
@click.option("--to", "to", required=True, multiple=True, help="The contact's email.")
@click.option("--cc", "cc", multiple=True)
@click.option("--subject", required=True)
@click.option("--text", default=None)
@click.option("--html", default=None)
@click.option("--attach", "attach", multiple=True, type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--kind", type=click.Choice([k.value for k in OutboundKind]), default=OutboundKind.INDIVIDUAL
)
@click.option("--in-reply-to", "in_reply_to", default=None, help="Message-ID answered.")
@click.option("--idempotency-key", "idempotency_key", default=None)
@common_options
def send_command(
    user: str,
    subaccount: str,
    to: tuple[str, ...],
    cc: tuple[str, ...],
    subject: str,
    text: str | None,
    html: str | None,
    attach: tuple[str, ...],
    kind: str,
    in_reply_to: str | None,
    idempotency_key: str | None,
    config: str | None,
    json_mode: bool,
) -> None:
    """Send an email from the CRM (R1, R16, R17); print its id, Message-ID and state."""
    from storage.errors import StorageError

    if text is None and html is None:
        fail(json_mode, "bad_request", "give --text or --html")
    settings = cli_settings(config, json_mode)
    request = SendRequest(
        user=user,
        subaccount=subaccount,
        to=to,
        cc=cc,
        subject=subject,
        text=text,
        html=html,
        attachments=tuple(_attachment(p) for p in attach),
        kind=OutboundKind(kind),
        in_reply_to=MessageId(in_reply_to.strip("<>")) if in_reply_to else None,
        idempotency_key=idempotency_key,
    )
    try:
        record = asyncio.run(_send(settings, request))
    except SendRejected as exc:
        fail(json_mode, exc.code, str(exc))
    except StorageError as exc:
        fail(json_mode, exc.code, str(exc))
    doc = to_jsonable(record)
    text_out = f"{record.id} <{record.message_id}> {record.state}"
    if record.state == OutboundState.FAILED:
        fail(json_mode, record.error_code or "send_failed", f"{text_out}: {record.last_error}")
    emit(json_mode, doc, text_out)

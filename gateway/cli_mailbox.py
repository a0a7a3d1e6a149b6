"""``mailgate mailbox …``: connect, list, show and disconnect mailboxes (INTERFACE.md, R19-R21).

Thin: parse arguments, call ``gateway.mailboxes.MailboxService``, print the
result (``--json``: one JSON document). Registered by ``gateway/cli.py``
as ``main.add_command(mailbox_group)``. OAuth connects print the
authorization URL; the HTTP callback (``GET /oauth/callback``) finishes them.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import click

from gateway.cli_common import cli_settings, common_options, emit, fail, to_jsonable
from gateway.config import Security, Settings
from gateway.mailboxes import ImapServer, MailboxError, MailboxService
from gateway.secrets import MissingTokenKey
from ingest.types import Provider
from storage.repos.mailboxes import MailboxRecord

T = TypeVar("T")


def _run(
    settings: Settings, json_mode: bool, action: Callable[[MailboxService], Awaitable[T]]
) -> T:
    """Run ``action(service)`` on a fresh Database; map known errors to exit 1."""
    from storage.errors import StorageError

    try:
        return asyncio.run(_with_service(settings, action))
    except MailboxError as exc:
        fail(json_mode, exc.code, str(exc))
    except StorageError as exc:
        fail(json_mode, exc.code, str(exc))
    except MissingTokenKey as exc:
        fail(json_mode, "token_key_missing", str(exc))


async def _with_service(settings: Settings, action: Callable[[MailboxService], Awaitable[T]]) -> T:
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
        return await action(MailboxService(db, settings))
    finally:
        await db.close()


def _doc(record: MailboxRecord) -> dict[str, Any]:
    doc: dict[str, Any] = to_jsonable(record)
    return doc


def format_lag(seconds: float | None) -> str:
    """Return a sync lag for people: ``-``, ``0.4s``, ``42s``, ``12m05s``, ``3h04m``, ``2d03h``.

    Args:
        seconds: ``MailboxRecord.sync_lag_seconds`` (≥ 0), or None (nothing
            synced yet). Negative values are shown as 0.

    Returns:
        One short ASCII token, no spaces; precision drops as the lag grows
        (tenths under 10 s, then whole seconds, minutes, hours), truncated
        toward zero.
    """
    if seconds is None:
        return "-"
    seconds = max(0.0, seconds)
    if seconds < 10:
        return f"{int(seconds * 10) / 10:.1f}s"
    whole = int(seconds)
    for unit, size, sub, sub_size in (("d", 86400, "h", 3600), ("h", 3600, "m", 60)):
        if whole >= size:
            return f"{whole // size}{unit}{whole % size // sub_size:02d}{sub}"
    if whole >= 60:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole}s"


def _line(record: MailboxRecord) -> str:
    last = record.last_sync_at.isoformat() if record.last_sync_at else "-"
    return (
        f"{record.id}\t{record.provider.value}\t{record.address}\t{record.state.value}"
        f"\tlast sync {last}\tlag {format_lag(record.sync_lag_seconds)}"
        + (f"\t{record.last_error}" if record.last_error else "")
    )


@click.group("mailbox")
def mailbox_group() -> None:
    """Connected mailboxes (R19-R22)."""


@mailbox_group.command("connect")
@click.argument("user_email")
@click.option("--subaccount", required=True, help="Sub-account id or name.")
@click.option("--provider", type=click.Choice([p.value for p in Provider]), required=True)
@click.option("--update", is_flag=True, help="Replace the user's current mailbox (R20).")
@click.option("--imap-host", default=None)
@click.option("--imap-port", type=int, default=993, show_default=True)
@click.option("--imap-security", type=click.Choice([s.value for s in Security]), default="tls")
@click.option("--smtp-host", default=None)
@click.option("--smtp-port", type=int, default=587, show_default=True)
@click.option("--smtp-security", type=click.Choice([s.value for s in Security]), default="starttls")
@click.option("--username", default=None, help="IMAP/SMTP login (default: the address).")
@click.option("--address", default=None, help="Mailbox address when the username is not one.")
@click.option("--password-stdin", is_flag=True, help="Read the password from stdin.")
@common_options
def mailbox_connect(user_email: str, subaccount: str, provider: str, **opts: Any) -> None:
    """Print the authorization URL (gmail, outlook) or connect a generic IMAP mailbox."""
    json_mode, config = opts.pop("json_mode"), opts.pop("config")
    settings = cli_settings(config, json_mode)
    kind = Provider(provider)
    if kind is not Provider.IMAP:
        purpose = "update" if opts["update"] else "connect"
        req = _run(
            settings,
            json_mode,
            lambda s: s.start_authorization(user_email, subaccount, kind, purpose=purpose),
        )
        doc = {"authorization_url": req.url, "expires_at": req.expires_at, "provider": kind}
        emit(json_mode, doc, req.url)
        return
    server, password = _imap_args(opts, json_mode)
    record = _run(
        settings, json_mode, lambda s: s.connect_imap(user_email, subaccount, server, password)
    )
    emit(json_mode, _doc(record), _line(record))


def _imap_args(opts: dict[str, Any], json_mode: bool) -> tuple[ImapServer, str]:
    if not opts["imap_host"] or not opts["smtp_host"] or not opts["username"]:
        fail(json_mode, "bad_request", "--provider imap needs --imap-host, --smtp-host, --username")
    if not opts["password_stdin"]:
        fail(json_mode, "bad_request", "--provider imap needs --password-stdin")
    password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        fail(json_mode, "bad_request", "empty password on stdin")
    server = ImapServer(
        imap_host=opts["imap_host"],
        imap_port=opts["imap_port"],
        imap_security=Security(opts["imap_security"]),
        smtp_host=opts["smtp_host"],
        smtp_port=opts["smtp_port"],
        smtp_security=Security(opts["smtp_security"]),
        username=opts["username"],
        address=opts["address"] or "",
    )
    return server, password


@mailbox_group.command("list")
@common_options
def mailbox_list(config: str | None, json_mode: bool) -> None:
    """List mailboxes: id, provider, address, state, last sync, sync lag, last error."""
    records = _run(cli_settings(config, json_mode), json_mode, lambda s: s.list())
    emit(json_mode, [_doc(r) for r in records], "\n".join(_line(r) for r in records))


@mailbox_group.command("show")
@click.argument("mailbox_id", type=int)
@common_options
def mailbox_show(mailbox_id: int, config: str | None, json_mode: bool) -> None:
    """Show one mailbox (``--json``: every field, ``sync_lag_seconds`` a float or null)."""
    record = _run(cli_settings(config, json_mode), json_mode, lambda s: s.get(mailbox_id))
    emit(json_mode, _doc(record), _line(record))


@mailbox_group.command("disconnect")
@click.argument("mailbox_id", type=int)
@common_options
def mailbox_disconnect(mailbox_id: int, config: str | None, json_mode: bool) -> None:
    """Disconnect (R21): tokens deleted and revoked, messages kept."""
    record = _run(cli_settings(config, json_mode), json_mode, lambda s: s.disconnect(mailbox_id))
    emit(json_mode, _doc(record), _line(record))

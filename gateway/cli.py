"""``mailgate …``: parse arguments, call one service, print the result.

Every data-printing command takes ``--json`` and then prints exactly one
JSON document on stdout; logs go to stderr. Errors print a clear message
(``--json``: ``{"error": {"code", "message"}}``) and exit 1; usage errors
exit 2 (click's convention). The config file is ``-c``, else
``$MAILGATE_CONFIG``, else ``./config.example.toml`` (built-in defaults
when that file does not exist). Commands other than ``serve`` and
``config check`` upgrade the embedded SQLite schema by themselves.
"""

from __future__ import annotations

import asyncio
import csv
import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

import click
from sqlalchemy.orm import Session

from gateway.cli_common import (
    EXIT_FAILURE,
    cli_settings,
    common_options,
    emit,
    fail,
    run_db,
    to_jsonable,
)
from gateway.cli_mailbox import mailbox_group
from gateway.cli_send import send_command
from gateway.cli_settings import settings_link_command
from gateway.config import (
    ConfigError,
    ConfigIssue,
    config_path,
    load_settings,
)
from gateway.observability import setup_logging


@click.group()
@click.option("-v", "--verbose", is_flag=True, help="Log at DEBUG level.")
def main(verbose: bool) -> None:
    """mailgate: keep CRM conversations and users' mailboxes in sync."""
    setup_logging(logging.DEBUG if verbose else logging.INFO)


@main.command()
@click.option("-c", "--config", default=None, help="Config file.")
def serve(config: str | None) -> None:
    """Run the SMTP listener and the HTTP server until SIGTERM/SIGINT."""
    from gateway.app import SchemaOutOfDate
    from gateway.app import serve as run_serve

    settings = cli_settings(config, False)
    try:
        asyncio.run(run_serve(settings))
    except SchemaOutOfDate as exc:
        fail(False, "schema_out_of_date", str(exc))
    except OSError as exc:
        fail(False, "os_error", _start_failure(exc))
    except BaseExceptionGroup as group:  # raised out of serve's TaskGroup
        found = group.subgroup(OSError)
        if found is None:
            raise
        first = found.exceptions[0]
        while isinstance(first, BaseExceptionGroup):
            first = first.exceptions[0]
        fail(False, "os_error", _start_failure(first))


def _start_failure(exc: BaseException) -> str:
    """One line for a listener that cannot start (port taken, no permission)."""
    return (
        f"cannot start: {exc} (check smtp.host/smtp.port and http.host/http.port, "
        "and that data_dir is writable)"
    )


@main.group("config")
def config_group() -> None:
    """Inspect the configuration."""


def _issues_doc(issues: tuple[ConfigIssue, ...]) -> list[dict[str, str]]:
    return [{"key": i.key, "message": i.message} for i in issues]


@config_group.command("check")
@common_options
def config_check(config: str | None, json_mode: bool) -> None:
    """Validate the config; name the key path of every error; exit 1 on any."""
    path = config_path(config)
    try:
        load_settings(path)
    except ConfigError as exc:
        if json_mode:
            click.echo(
                json.dumps({"ok": False, "path": str(path), "errors": _issues_doc(exc.issues)})
            )
        else:
            for issue in exc.issues:
                click.echo(f"{path}: {issue}", err=True)
        sys.exit(EXIT_FAILURE)
    emit(json_mode, {"ok": True, "path": str(path), "errors": []}, f"{path}: ok")


@main.group("db")
def db_group() -> None:
    """Database schema."""


@db_group.command("upgrade")
@common_options
def db_upgrade(config: str | None, json_mode: bool) -> None:
    """Apply Alembic migrations up to the head revision."""
    from storage.db import Database
    from storage.migrate import schema_status, upgrade

    settings = cli_settings(config, json_mode)

    async def run() -> tuple[str | None, str]:
        await asyncio.to_thread(upgrade, settings.storage.database_url)
        db = Database(settings.storage.database_url)
        try:
            return await schema_status(db)
        finally:
            await db.close()

    try:
        current, head = asyncio.run(run())
    except Exception as exc:  # report, exit 1
        fail(json_mode, "upgrade_failed", f"{type(exc).__name__}: {exc}")
    emit(json_mode, {"revision": current, "head": head}, f"schema at {current}")


@main.group("subaccount")
def subaccount_group() -> None:
    """Sub-accounts (tenants)."""


@subaccount_group.command("add")
@click.argument("name")
@common_options
def subaccount_add(name: str, config: str | None, json_mode: bool) -> None:
    """Create a sub-account; print its id."""
    from storage.repos.directory import add_subaccount

    settings = cli_settings(config, json_mode)
    new_id = run_db(settings, json_mode, lambda s: add_subaccount(s, name))
    emit(json_mode, {"id": new_id}, str(new_id))


def _subaccount_ids(session: Session, refs: tuple[str, ...]) -> list[int]:
    from storage.repos.directory import resolve_subaccount

    return [resolve_subaccount(session, ref) for ref in refs]


@main.group("user")
def user_group() -> None:
    """CRM users."""


@user_group.command("add")
@click.argument("email")
@click.option("--name", required=True, help="Display name.")
@click.option("--subaccount", "subaccounts", multiple=True, required=True, help="Id or name.")
@common_options
def user_add(
    email: str, name: str, subaccounts: tuple[str, ...], config: str | None, json_mode: bool
) -> None:
    """Create a user with memberships in the given sub-accounts; print its id."""
    from storage.repos.directory import add_user

    settings = cli_settings(config, json_mode)

    def action(session: Session) -> int:
        return add_user(session, email, name, _subaccount_ids(session, subaccounts))

    new_id = run_db(settings, json_mode, action)
    emit(json_mode, {"id": new_id}, str(new_id))


@main.group("contact")
def contact_group() -> None:
    """Contacts of a sub-account."""


@contact_group.command("add")
@click.argument("email")
@click.option("--subaccount", required=True, help="Id or name.")
@click.option("--name", default=None)
@click.option("--assign", "assign", default=None, help="Assigned user's email.")
@common_options
def contact_add(
    email: str,
    subaccount: str,
    name: str | None,
    assign: str | None,
    config: str | None,
    json_mode: bool,
) -> None:
    """Create a contact; print its id."""
    from storage.repos.directory import add_contact

    settings = cli_settings(config, json_mode)

    def action(session: Session) -> int:
        [sub_id] = _subaccount_ids(session, (subaccount,))
        return add_contact(session, sub_id, email, name, assign)

    new_id = run_db(settings, json_mode, action)
    emit(json_mode, {"id": new_id}, str(new_id))


@contact_group.command("import")
@click.argument("csv_path", metavar="CSV", type=click.Path(exists=True, dir_okay=False))
@click.option("--subaccount", required=True, help="Id or name.")
@common_options
def contact_import(csv_path: str, subaccount: str, config: str | None, json_mode: bool) -> None:
    """Import contacts from a UTF-8 CSV with columns email,name,assigned_user_email.

    Valid rows are imported; each invalid row is reported with its line
    number and the command then exits 1, so a script notices.
    """
    from storage.repos.directory import import_contacts

    settings = cli_settings(config, json_mode)
    rows = _read_contacts_csv(csv_path, json_mode)

    def action(session: Session) -> Any:
        [sub_id] = _subaccount_ids(session, (subaccount,))
        return import_contacts(session, sub_id, rows)

    report = run_db(settings, json_mode, action)
    lines = [f"created {report.created}, skipped {report.skipped}, errors {len(report.errors)}"]
    lines.extend(f"  line {line}: {reason}" for line, reason in report.errors)
    emit(json_mode, report, "\n".join(lines))
    if report.errors:
        sys.exit(EXIT_FAILURE)


CSV_COLUMNS = ("email", "name", "assigned_user_email")


def _read_contacts_csv(path: str, json_mode: bool) -> list[dict[str, str]]:
    """Read the import file; a wrong encoding or header is an error naming the fix."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            header = [h.strip().lower() for h in reader.fieldnames or ()]
            if "email" not in header:
                fail(
                    json_mode,
                    "csv_header",
                    f"{path}: the first line must name the columns {','.join(CSV_COLUMNS)} "
                    f"(found: {','.join(header) or 'nothing'})",
                )
            return [
                {(k or "").strip().lower(): (v or "") for k, v in row.items()} for row in reader
            ]
    except UnicodeDecodeError as exc:
        fail(
            json_mode,
            "csv_encoding",
            f"{path}: not UTF-8 (byte 0x{exc.object[exc.start]:02x} at offset {exc.start}); "
            "save it as 'CSV UTF-8'",
        )
    except csv.Error as exc:
        fail(json_mode, "csv_invalid", f"{path}: {exc}")


@main.command("bcc-address")
@click.argument("user_email")
@click.option("--subaccount", required=True, help="Id or name.")
@common_options
def bcc_address(user_email: str, subaccount: str, config: str | None, json_mode: bool) -> None:
    """Print the user's sync address in a sub-account (R14)."""
    from storage.repos.directory import sync_address

    settings = cli_settings(config, json_mode)

    def action(session: Session) -> str:
        [sub_id] = _subaccount_ids(session, (subaccount,))
        return sync_address(session, user_email, sub_id, settings.bcc.domain)

    address = run_db(settings, json_mode, action)
    emit(json_mode, {"address": address}, address)


@main.group("conversation")
def conversation_group() -> None:
    """Contact conversations."""


@conversation_group.command("show")
@click.argument("contact_email")
@click.option("--subaccount", required=True, help="Id or name.")
@common_options
def conversation_show(
    contact_email: str, subaccount: str, config: str | None, json_mode: bool
) -> None:
    """Show a contact's conversation, oldest message first."""
    from storage.repos.messages import conversation_view

    settings = cli_settings(config, json_mode)

    def action(session: Session) -> Any:
        [sub_id] = _subaccount_ids(session, (subaccount,))
        return conversation_view(session, sub_id, contact_email)

    view = to_jsonable(run_db(settings, json_mode, action))
    lines = [
        f"{m.get('date') or m.get('date_at') or '-'}  {m.get('direction', '')}  "
        f"{m.get('subject', '')}"
        for m in view.get("messages", [])
    ]
    emit(json_mode, view, "\n".join(lines) or "(no messages)")


def _parse_since(value: str | None) -> datetime | None:
    """Parse ``--since``: ISO 8601; a time without offset is taken as UTC."""
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise click.BadParameter(f"not an ISO 8601 time: {value!r}") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


@main.command("log")
@click.option("--mailbox", "mailbox_id", type=int, default=None, help="Mailbox id.")
@click.option("--since", callback=lambda _c, _p, v: _parse_since(v), help="ISO 8601 time.")
@common_options
def sync_log(
    mailbox_id: int | None, since: datetime | None, config: str | None, json_mode: bool
) -> None:
    """Show the sync log: what was skipped or refused, and why."""
    from storage.repos.sync_log import list_sync_log

    settings = cli_settings(config, json_mode)
    rows = to_jsonable(
        run_db(settings, json_mode, lambda s: list_sync_log(s, mailbox_id=mailbox_id, since=since))
    )
    lines = [
        "  ".join(str(r.get(k, "")) for k in ("at", "rule", "outcome", "reason")) for r in rows
    ]
    emit(json_mode, {"entries": rows}, "\n".join(lines) or "(empty)")


main.add_command(mailbox_group)
main.add_command(settings_link_command)
main.add_command(send_command)  # issue 5: `mailgate send` (gateway/cli_send.py)

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
import dataclasses
import enum
import json
import logging
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click
from sqlalchemy.ext.asyncio import AsyncSession

from gateway.config import (
    DEFAULT_CONFIG_PATH,
    ConfigError,
    ConfigIssue,
    Settings,
    config_path,
    load_settings,
    make_settings,
)
from gateway.observability import setup_logging

T = TypeVar("T")
log = logging.getLogger(__name__)

EXIT_FAILURE = 1


def to_jsonable(value: Any) -> Any:
    """Convert frozen dataclasses, enums, datetimes, tuples and sets into JSON values."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            f.name.removesuffix("_"): to_jsonable(getattr(value, f.name))
            for f in dataclasses.fields(value)
        }
    if isinstance(value, enum.Enum):
        return to_jsonable(value.value)
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, frozenset | set):
        return sorted((to_jsonable(v) for v in value), key=str)
    if isinstance(value, list | tuple):
        return [to_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, bytes):
        return None
    return value


def _emit(json_mode: bool, doc: Any, text: str) -> None:
    if json_mode:
        click.echo(json.dumps(to_jsonable(doc), ensure_ascii=False, sort_keys=False))
    else:
        click.echo(text)


def _fail(json_mode: bool, code: str, message: str) -> NoReturn:
    if json_mode:
        click.echo(json.dumps({"error": {"code": code, "message": message}}))
    else:
        click.echo(f"error: {message}", err=True)
    sys.exit(EXIT_FAILURE)


def _settings(config: str | None, json_mode: bool) -> Settings:
    path = config_path(config)
    try:
        if config is None and path == DEFAULT_CONFIG_PATH and not path.exists():
            log.warning("no config file, using defaults", extra={"path": str(path)})
            return make_settings()
        return load_settings(path)
    except ConfigError as exc:
        _fail(json_mode, "config_invalid", str(exc))


def _run_db(
    settings: Settings, json_mode: bool, action: Callable[[AsyncSession], Awaitable[T]]
) -> T:
    """Run ``action`` in one committed transaction; map errors to exit 1."""
    from storage.errors import StorageError

    try:
        return asyncio.run(_with_session(settings, action))
    except StorageError as exc:
        _fail(json_mode, exc.code, str(exc))
    except Exception as exc:  # the CLI's one handler: report, never a traceback dump
        from gateway.app import SchemaOutOfDate

        if isinstance(exc, SchemaOutOfDate):
            _fail(json_mode, "schema_out_of_date", str(exc))
        log.debug("command failed", exc_info=True)
        _fail(json_mode, "failed", f"{type(exc).__name__}: {exc}")


async def _with_session(settings: Settings, action: Callable[[AsyncSession], Awaitable[T]]) -> T:
    from gateway.app import ensure_schema
    from storage.db import make_engine, make_session_factory

    engine = make_engine(settings.storage.database_url)
    try:
        await ensure_schema(engine, settings)
        async with make_session_factory(engine)() as session, session.begin():
            return await action(session)
    finally:
        await engine.dispose()


def _common(func: Callable[..., Any]) -> Callable[..., Any]:
    func = click.option("--json", "json_mode", is_flag=True, help="Print one JSON document.")(func)
    return click.option(
        "-c",
        "--config",
        default=None,
        help="Config file (default: $MAILGATE_CONFIG or ./config.example.toml).",
    )(func)


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

    settings = _settings(config, False)
    try:
        asyncio.run(run_serve(settings))
    except SchemaOutOfDate as exc:
        _fail(False, "schema_out_of_date", str(exc))
    except OSError as exc:
        _fail(False, "os_error", f"cannot start: {exc}")


@main.group("config")
def config_group() -> None:
    """Inspect the configuration."""


def _issues_doc(issues: tuple[ConfigIssue, ...]) -> list[dict[str, str]]:
    return [{"key": i.key, "message": i.message} for i in issues]


@config_group.command("check")
@_common
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
    _emit(json_mode, {"ok": True, "path": str(path), "errors": []}, f"{path}: ok")


@main.group("db")
def db_group() -> None:
    """Database schema."""


@db_group.command("upgrade")
@_common
def db_upgrade(config: str | None, json_mode: bool) -> None:
    """Apply Alembic migrations up to the head revision."""
    from storage.db import make_engine
    from storage.migrate import schema_status, upgrade

    settings = _settings(config, json_mode)

    async def run() -> tuple[str | None, str]:
        await asyncio.to_thread(upgrade, settings.storage.database_url)
        engine = make_engine(settings.storage.database_url)
        try:
            return await schema_status(engine)
        finally:
            await engine.dispose()

    try:
        current, head = asyncio.run(run())
    except Exception as exc:  # report, exit 1
        _fail(json_mode, "upgrade_failed", f"{type(exc).__name__}: {exc}")
    _emit(json_mode, {"revision": current, "head": head}, f"schema at {current}")


@main.group("subaccount")
def subaccount_group() -> None:
    """Sub-accounts (tenants)."""


@subaccount_group.command("add")
@click.argument("name")
@_common
def subaccount_add(name: str, config: str | None, json_mode: bool) -> None:
    """Create a sub-account; print its id."""
    from storage.repos.directory import add_subaccount

    settings = _settings(config, json_mode)
    new_id = _run_db(settings, json_mode, lambda s: add_subaccount(s, name))
    _emit(json_mode, {"id": new_id}, str(new_id))


async def _subaccount_ids(session: AsyncSession, refs: tuple[str, ...]) -> list[int]:
    from storage.repos.directory import resolve_subaccount

    return [await resolve_subaccount(session, ref) for ref in refs]


@main.group("user")
def user_group() -> None:
    """CRM users."""


@user_group.command("add")
@click.argument("email")
@click.option("--name", required=True, help="Display name.")
@click.option("--subaccount", "subaccounts", multiple=True, required=True, help="Id or name.")
@_common
def user_add(
    email: str, name: str, subaccounts: tuple[str, ...], config: str | None, json_mode: bool
) -> None:
    """Create a user with memberships in the given sub-accounts; print its id."""
    from storage.repos.directory import add_user

    settings = _settings(config, json_mode)

    async def action(session: AsyncSession) -> int:
        return await add_user(session, email, name, await _subaccount_ids(session, subaccounts))

    new_id = _run_db(settings, json_mode, action)
    _emit(json_mode, {"id": new_id}, str(new_id))


@main.group("contact")
def contact_group() -> None:
    """Contacts of a sub-account."""


@contact_group.command("add")
@click.argument("email")
@click.option("--subaccount", required=True, help="Id or name.")
@click.option("--name", default=None)
@click.option("--assign", "assign", default=None, help="Assigned user's email.")
@_common
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

    settings = _settings(config, json_mode)

    async def action(session: AsyncSession) -> int:
        [sub_id] = await _subaccount_ids(session, (subaccount,))
        return await add_contact(session, sub_id, email, name, assign)

    new_id = _run_db(settings, json_mode, action)
    _emit(json_mode, {"id": new_id}, str(new_id))


@contact_group.command("import")
@click.argument("csv_path", metavar="CSV", type=click.Path(exists=True, dir_okay=False))
@click.option("--subaccount", required=True, help="Id or name.")
@_common
def contact_import(csv_path: str, subaccount: str, config: str | None, json_mode: bool) -> None:
    """Import contacts from a CSV with columns email,name,assigned_user_email."""
    from storage.repos.directory import import_contacts

    settings = _settings(config, json_mode)
    with open(csv_path, newline="", encoding="utf-8-sig") as handle:
        rows = list(csv.DictReader(handle))

    async def action(session: AsyncSession) -> Any:
        [sub_id] = await _subaccount_ids(session, (subaccount,))
        return await import_contacts(session, sub_id, rows)

    report = _run_db(settings, json_mode, action)
    _emit(
        json_mode,
        report,
        f"created {report.created}, skipped {report.skipped}, errors {len(report.errors)}",
    )


@main.command("bcc-address")
@click.argument("user_email")
@click.option("--subaccount", required=True, help="Id or name.")
@_common
def bcc_address(user_email: str, subaccount: str, config: str | None, json_mode: bool) -> None:
    """Print the user's sync address in a sub-account (R14)."""
    from storage.repos.directory import sync_address

    settings = _settings(config, json_mode)

    async def action(session: AsyncSession) -> str:
        [sub_id] = await _subaccount_ids(session, (subaccount,))
        return await sync_address(session, user_email, sub_id, settings.bcc.domain)

    address = _run_db(settings, json_mode, action)
    _emit(json_mode, {"address": address}, address)


@main.group("conversation")
def conversation_group() -> None:
    """Contact conversations."""


@conversation_group.command("show")
@click.argument("contact_email")
@click.option("--subaccount", required=True, help="Id or name.")
@_common
def conversation_show(
    contact_email: str, subaccount: str, config: str | None, json_mode: bool
) -> None:
    """Show a contact's conversation, oldest message first."""
    from storage.repos.messages import conversation_view

    settings = _settings(config, json_mode)

    async def action(session: AsyncSession) -> Any:
        [sub_id] = await _subaccount_ids(session, (subaccount,))
        return await conversation_view(session, sub_id, contact_email)

    view = to_jsonable(_run_db(settings, json_mode, action))
    lines = [
        f"{m.get('date') or m.get('date_at') or '-'}  {m.get('direction', '')}  "
        f"{m.get('subject', '')}"
        for m in view.get("messages", [])
    ]
    _emit(json_mode, view, "\n".join(lines) or "(no messages)")


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
@_common
def sync_log(
    mailbox_id: int | None, since: datetime | None, config: str | None, json_mode: bool
) -> None:
    """Show the sync log: what was skipped or refused, and why."""
    from storage.repos.sync_log import list_sync_log

    settings = _settings(config, json_mode)
    rows = to_jsonable(
        _run_db(settings, json_mode, lambda s: list_sync_log(s, mailbox_id=mailbox_id, since=since))
    )
    lines = [
        "  ".join(str(r.get(k, "")) for k in ("at", "rule", "outcome", "reason")) for r in rows
    ]
    _emit(json_mode, {"entries": rows}, "\n".join(lines) or "(empty)")

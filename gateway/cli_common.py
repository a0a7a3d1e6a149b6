"""Shared pieces of the ``mailgate`` commands: options, JSON output, errors, the database.

Edge module: every command prints one JSON document with ``--json`` (logs go
to stderr), exits 1 on failure with ``{"error": {"code", "message"}}``, and
runs its database work as one committed transaction.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import json
import logging
import sys
from collections.abc import Callable
from datetime import date, datetime
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click
from sqlalchemy.orm import Session

from gateway.config import (
    DEFAULT_CONFIG_PATH,
    ConfigError,
    Settings,
    config_path,
    load_settings,
    make_settings,
)

log = logging.getLogger(__name__)

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


def emit(json_mode: bool, doc: Any, text: str) -> None:
    if json_mode:
        click.echo(json.dumps(to_jsonable(doc), ensure_ascii=False, sort_keys=False))
    else:
        click.echo(text)


def fail(json_mode: bool, code: str, message: str) -> NoReturn:
    if json_mode:
        click.echo(json.dumps({"error": {"code": code, "message": message}}))
    else:
        click.echo(f"error: {message}", err=True)
    sys.exit(EXIT_FAILURE)


def cli_settings(config: str | None, json_mode: bool) -> Settings:
    path = config_path(config)
    try:
        if config is None and path == DEFAULT_CONFIG_PATH and not path.exists():
            log.warning("no config file, using defaults", extra={"path": str(path)})
            return make_settings()
        return load_settings(path)
    except ConfigError as exc:
        fail(json_mode, "config_invalid", str(exc))


def run_db(settings: Settings, json_mode: bool, action: Callable[[Session], T]) -> T:
    """Run the sync ``action`` in one committed transaction; map errors to exit 1."""
    from storage.errors import StorageError

    try:
        return asyncio.run(_with_session(settings, action))
    except StorageError as exc:
        fail(json_mode, exc.code, str(exc))
    except Exception as exc:  # the CLI's one handler: report, never a traceback dump
        from gateway.app import SchemaOutOfDate

        if isinstance(exc, SchemaOutOfDate):
            fail(json_mode, "schema_out_of_date", str(exc))
        log.debug("command failed", exc_info=True)
        if isinstance(exc, ValueError):  # bad input the repositories rejected
            fail(json_mode, "invalid", str(exc))
        fail(json_mode, "failed", f"{type(exc).__name__}: {exc}")


async def _with_session(settings: Settings, action: Callable[[Session], T]) -> T:
    from gateway.app import ensure_schema
    from storage.db import Database

    db = Database(settings.storage.database_url)
    try:
        await ensure_schema(db, settings)
        return await db.run(action)
    finally:
        await db.close()


def common_options(func: Callable[..., Any]) -> Callable[..., Any]:
    func = click.option("--json", "json_mode", is_flag=True, help="Print one JSON document.")(func)
    return click.option(
        "-c",
        "--config",
        default=None,
        help="Config file (default: $MAILGATE_CONFIG or ./config.example.toml).",
    )(func)

"""Declarative base, column types and naming convention for every table.

Edge module: defines types only; no queries, no sessions. Times are stored
as aware UTC on every backend (``UtcDateTime``); enum columns hold the
StrEnum's literal value in a plain string column (no DB enum types), so the
same schema and migrations work on SQLite and PostgreSQL.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, ClassVar

import sqlalchemy as sa
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}
"""Constraint names identical on every backend, so migrations can name them."""


def utcnow() -> datetime:
    """Return the current time as an aware UTC datetime (column default)."""
    return datetime.now(UTC)


class UtcDateTime(sa.TypeDecorator[datetime]):
    """A timestamp that is always aware UTC in Python.

    PostgreSQL stores ``timestamptz``. SQLite has no time zones: the value is
    converted to UTC and stored naive, and given ``tzinfo=UTC`` on load.

    Raises:
        ValueError: on binding a naive datetime (a bug: STYLE.md §5).
    """

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        """Convert to UTC; naive on SQLite."""
        if value is None:
            return None
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError("naive datetime given to a UtcDateTime column")
        value = value.astimezone(UTC)
        if dialect.name == "sqlite":
            return value.replace(tzinfo=None)
        return value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        """Return aware UTC whatever the backend returned."""
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


def str_enum(enum_cls: type[StrEnum]) -> sa.Enum:
    """Return a portable string column type holding ``enum_cls`` values.

    Args:
        enum_cls: a StrEnum; its *values* (not names) are stored.

    Returns:
        ``sa.Enum`` with ``native_enum=False`` and no CHECK constraint: a
        VARCHAR sized to the longest value; loads as ``enum_cls`` members.
    """
    return sa.Enum(
        enum_cls,
        native_enum=False,
        create_constraint=False,
        length=32,
        values_callable=_enum_values,
        validate_strings=True,
    )


def _enum_values(enum_cls: type[StrEnum]) -> list[str]:
    return [member.value for member in enum_cls]


class Base(DeclarativeBase):
    """Declarative base of every mailgate table."""

    metadata = sa.MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map: ClassVar[dict[Any, Any]] = {datetime: UtcDateTime()}

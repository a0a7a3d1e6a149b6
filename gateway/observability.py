"""Logging format and Prometheus metrics (STYLE.md §11).

``setup_logging`` installs the one formatter: JSON lines when stderr is not
a terminal, ``key=value`` on a terminal. Log calls pass variable data in
``extra={...}`` with the fixed field names listed in ``FIELDS``.
``Metrics`` owns its own ``CollectorRegistry`` (no module-level state).

Never log message bodies, subjects, tokens or passwords.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from importlib import metadata

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

FIELDS = (
    "peer",
    "message_id",
    "message_pk",
    "rule",
    "reason",
    "size_bytes",
    "duration_seconds",
    "subaccount_id",
    "incident",
    "count",
    "host",
    "port",
    "path",
    "batch_size",
    "open_files_soft",
    "open_files_hard",
    "mailbox_id",
    "folder",
    "outbound_id",
)
"""Fixed field names a log record may carry (``extra=``)."""


def version() -> str:
    """Return the installed mailgate version, or ``0+unknown`` in a bare checkout."""
    try:
        return metadata.version("mailgate")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def _fields(record: logging.LogRecord) -> dict[str, object]:
    out: dict[str, object] = {}
    for name in FIELDS:
        if hasattr(record, name):
            out[name] = getattr(record, name)
    return out


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, event, fields, exc."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
            **_fields(record),
        }
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str, ensure_ascii=False)


class KeyValueFormatter(logging.Formatter):
    """``time level logger event key=value …`` for a terminal."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = datetime.fromtimestamp(record.created, UTC).strftime("%H:%M:%S.%f")[:-3]
        pairs = " ".join(f"{k}={json.dumps(v, default=str)}" for k, v in _fields(record).items())
        line = f"{stamp} {record.levelname:<7} {record.name}: {record.getMessage()} {pairs}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line.rstrip()


PROTOCOL_LOGGERS = ("aioimaplib", "imapclient", "imapclient.imaplib", "mail.log")
"""Third-party loggers that print protocol lines (they may carry credentials)."""

_SECRET_LINE = re.compile(
    r"(?i)\b(AUTHENTICATE\s+\S+|AUTH\s+\S+|LOGIN)\b.*"
    r"|\b[A-Za-z0-9+/]{40,}={0,2}"  # a long base64 run: SASL responses, tokens
)


class RedactingFilter(logging.Filter):
    """Masks credentials in protocol log lines (STYLE.md §8).

    aioimaplib logs ``AUTHENTICATE XOAUTH2 <base64>`` at DEBUG with the
    token inside the base64 (its own scrubbing masks only the raw token),
    and imaplib-style loggers print ``LOGIN user password``. Everything
    after the verb, and any long base64 run, becomes ``[redacted]``.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        """Rewrite a protocol logger's message in place; never drops a record."""
        if not record.name.startswith(PROTOCOL_LOGGERS):
            return True
        message = record.getMessage()
        redacted = _SECRET_LINE.sub(_mask, message)
        if redacted != message:
            record.msg, record.args = redacted, None
        return True


def _mask(match: re.Match[str]) -> str:
    verb = match.group(1)
    return f"{verb} [redacted]" if verb else "[redacted]"


def setup_logging(level: int = logging.INFO, *, json_lines: bool | None = None) -> None:
    """Configure the root logger to write to stderr with the house formatter.

    Args:
        level: root level.
        json_lines: force JSON (True) or key=value (False); None picks JSON
            unless stderr is a terminal.
    """
    use_json = (not sys.stderr.isatty()) if json_lines is None else json_lines
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if use_json else KeyValueFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # aiosmtpd logs every command line at INFO (including MAIL/RCPT addresses).
    logging.getLogger("mail.log").setLevel(logging.WARNING)
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    # APScheduler logs every run of every job at INFO (twice a minute with no mailboxes).
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
    # On the handler, not the loggers: a logger's filters do not see records
    # of its children (aioimaplib logs as "aioimaplib.aioimaplib").
    handler.addFilter(RedactingFilter())
    # The formatters print none of these; computing them for every record
    # (caller frame, thread, process) cost about a third of a log call, and
    # the intake logs every message (Logging HOWTO, "Optimization").
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    for name in PROTOCOL_LOGGERS:
        protocol_log = logging.getLogger(name)
        if protocol_log.level in (logging.NOTSET, logging.DEBUG):
            protocol_log.setLevel(logging.INFO)


SYNC_LAG_BUCKETS = (0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0, 3600.0, 86400.0)
"""Buckets of ``mailgate_sync_lag_seconds``: Dovecot notifies after ~0.5 s; catch-up after hours."""


class Metrics:
    """The process's Prometheus metrics, in a registry of their own."""

    def __init__(self) -> None:
        """Create every metric at zero."""
        self.registry = CollectorRegistry()
        self.accepted = Counter(
            "mailgate_messages_accepted",
            "Messages acknowledged after a durable commit.",
            ("source",),
            registry=self.registry,
        )
        self.smtp_rejections = Counter(
            "mailgate_smtp_rejections",
            "SMTP replies refusing a command or a message (4xx and 5xx), by reply code.",
            ("code",),
            registry=self.registry,
        )
        self.refused = Counter(
            "mailgate_messages_refused",
            "Messages refused, by rule.",
            ("source", "rule"),
            registry=self.registry,
        )
        self.stage_seconds = Histogram(
            "mailgate_ingest_stage_seconds",
            "Time spent per ingest stage.",
            ("stage",),
            registry=self.registry,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0),
        )
        self.build_info = Gauge(
            "mailgate_build_info", "Build information.", ("version",), registry=self.registry
        )
        self.build_info.labels(version=version()).set(1)
        self.imap_sessions = Gauge(
            "mailgate_imap_sessions",
            "IMAP watchers (one session each) by provider and watcher state.",
            ("provider", "state"),
            registry=self.registry,
        )
        self.sync_lag_seconds = Histogram(
            "mailgate_sync_lag_seconds",
            "IMAP INTERNALDATE to durable commit of a stored message.",
            ("provider",),
            registry=self.registry,
            buckets=SYNC_LAG_BUCKETS,
        )
        self.uidvalidity_resets = Counter(
            "mailgate_imap_uidvalidity_resets",
            "Folder resyncs after a UIDVALIDITY change (RFC 9051 §2.3.1.1).",
            ("provider",),
            registry=self.registry,
        )
        self._refreshers: list[Callable[[], None]] = []

    def add_refresher(self, refresh: Callable[[], None]) -> None:
        """Register a callable run before every ``render`` (sets gauges from live state)."""
        self._refreshers.append(refresh)

    def render(self) -> bytes:
        """Return the Prometheus text exposition of every metric."""
        for refresh in self._refreshers:
            refresh()
        return generate_latest(self.registry)

"""Load the TOML config into a frozen ``Settings`` value (STYLE.md §9).

``serve``, ``config check`` and every other command use ``load_settings``.
Every problem is reported as a ``ConfigIssue`` naming its dotted TOML key
path (``providers.gmail.daily_send_limit``), never as a bare exception.
Secrets may be written ``"env:NAME"`` or ``"file:/path"``; they are
resolved at load time into ``SecretStr`` and never logged.

This module does not open sockets or touch the database; it reads the
config file, secret files and checks that TLS files are readable.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

DEFAULT_CONFIG_PATH = Path("config.example.toml")
"""Used when neither ``-c`` nor ``$MAILGATE_CONFIG`` names a file."""

CONFIG_ENV_VAR = "MAILGATE_CONFIG"
MIB = 1024 * 1024


def _resolve_secret(value: object) -> object:
    """Resolve ``env:NAME`` / ``file:PATH`` references (else pass through).

    Raises:
        ValueError: the variable is unset or the file is unreadable; pydantic
            reports it under the key's path.
    """
    if not isinstance(value, str):
        return value
    if value.startswith("env:"):
        name = value[4:]
        if name not in os.environ:
            raise ValueError(f"environment variable {name} is not set")
        return os.environ[name]
    if value.startswith("file:"):
        path = Path(value[5:])
        try:
            return path.read_text(encoding="utf-8").rstrip("\r\n")
        except OSError as exc:
            raise ValueError(f"cannot read secret file {path}: {exc.strerror}") from None
    return value


Secret = Annotated[SecretStr, BeforeValidator(_resolve_secret)]
"""A secret given literally, as ``env:NAME`` or as ``file:/path``."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _readable_file(value: Path | None) -> Path | None:
    """Check a configured file exists and can be read (TLS, CA files)."""
    if value is None:
        return None
    try:
        with value.open("rb") as handle:
            handle.read(1)
    except OSError as exc:
        raise ValueError(f"cannot read {value}: {exc.strerror}") from None
    return value


class StorageSettings(_Section):
    """``[storage]``: where rows, raw messages and attachments live."""

    database_url: str = "sqlite+aiosqlite:///./data/mailgate.db"
    data_dir: Path = Path("./data")

    @field_validator("database_url")
    @classmethod
    def _known_driver(cls, value: str) -> str:
        if not value.startswith(("sqlite+aiosqlite://", "postgresql+asyncpg://")):
            raise ValueError("must start with sqlite+aiosqlite:// or postgresql+asyncpg://")
        return value


class SmtpSettings(_Section):
    """``[smtp]``: the BCC-ingest listener (RFC 5321)."""

    host: str = "127.0.0.1"
    port: int = Field(default=2525, ge=0, le=65535)
    hostname: str = ""
    max_message_bytes: int = Field(default=36 * MIB, ge=1024)
    tls_cert: Path | None = None
    tls_key: Path | None = None
    require_starttls: bool = False

    _check_files = field_validator("tls_cert", "tls_key")(_readable_file)

    @model_validator(mode="after")
    def _tls_pair(self) -> SmtpSettings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key must be set together")
        if self.require_starttls and self.tls_cert is None:
            raise ValueError("require_starttls needs tls_cert and tls_key")
        return self


class BccSettings(_Section):
    """``[bcc]``: sync addresses and the R14/R15 switches."""

    domain: str = Field(default="bcc.mailgate.localhost", min_length=1)
    create_contacts: bool = True
    require_dmarc: bool = False
    dns_server: str = Field(default="", pattern=r"^$|^\[?[0-9A-Za-z.:-]+\]?(:[0-9]{1,5})?$")
    aliases: dict[str, tuple[str, ...]] = Field(default_factory=dict)


class ApiKey(_Section):
    """One ``[[http.api_keys]]`` entry; empty ``subaccounts`` means all."""

    name: str
    key: Secret
    subaccounts: tuple[str, ...] = ()


class HttpSettings(_Section):
    """``[http]``: the ASGI server (health, metrics, the API, the settings page).

    ``session_secret`` signs the settings page's session cookie and its
    sign-in links (itsdangerous HMAC); unset, the page is disabled.
    """

    host: str = "127.0.0.1"
    port: int = Field(default=8025, ge=0, le=65535)
    public_url: str = "http://127.0.0.1:8025"
    api_keys: tuple[ApiKey, ...] = ()
    session_secret: Secret | None = None
    session_max_age_seconds: int = Field(default=43200, ge=60)
    login_link_ttl_seconds: int = Field(default=900, ge=10)


class SecuritySettings(_Section):
    """``[security]``: ``token_key`` encrypts tokens at rest (needed to connect mailboxes)."""

    token_key: Secret | None = None
    previous_token_keys: tuple[Secret, ...] = ()


class SyncSettings(_Section):
    """``[sync]``: IMAP watcher timing (RFC 2177 §3: renew IDLE under 29 min)."""

    idle_renew_seconds: int = Field(default=600, ge=30, le=1740)
    reconnect_backoff_max_seconds: int = Field(default=300, ge=1)
    backfill_days: int = Field(default=0, ge=0)


class Security(StrEnum):
    """Transport security of an IMAP/SMTP connection."""

    TLS = "tls"
    STARTTLS = "starttls"
    PLAIN = "plain"


class ProviderSettings(_Section):
    """``[providers.<name>]``: endpoints and limits (R17) of one provider."""

    client_id: str | None = None
    client_secret: Secret | None = None
    authorize_url: str | None = None
    token_url: str | None = None
    userinfo_url: str | None = None
    revoke_url: str | None = None
    issuer: str | None = None
    jwks_url: str | None = None
    scopes: tuple[str, ...] = ()
    refresh_ahead_seconds: int = Field(default=300, ge=0)
    imap_host: str | None = None
    imap_port: int = Field(default=993, ge=1, le=65535)
    imap_security: Security = Security.TLS
    smtp_host: str | None = None
    smtp_port: int = Field(default=587, ge=1, le=65535)
    smtp_security: Security = Security.STARTTLS
    ca_file: Path | None = None
    daily_send_limit: int | None = Field(default=None, ge=1)
    max_recipients_per_message: int | None = Field(default=None, ge=1)
    max_message_bytes: int | None = Field(default=None, ge=1)
    max_attachment_bytes: int | None = Field(default=None, ge=1)
    allowed_attachment_types: tuple[str, ...] | None = None
    contact_initiated: bool = False

    _check_ca = field_validator("ca_file")(_readable_file)


class GmailSettings(ProviderSettings):
    """Google's endpoints (developers.google.com/identity/protocols/oauth2) and limits."""

    authorize_url: str | None = "https://accounts.google.com/o/oauth2/v2/auth"
    token_url: str | None = "https://oauth2.googleapis.com/token"  # noqa: S105
    userinfo_url: str | None = "https://openidconnect.googleapis.com/v1/userinfo"
    revoke_url: str | None = "https://oauth2.googleapis.com/revoke"
    issuer: str | None = "https://accounts.google.com"
    jwks_url: str | None = "https://www.googleapis.com/oauth2/v3/certs"
    scopes: tuple[str, ...] = ("https://mail.google.com/", "openid", "email")
    imap_host: str | None = "imap.gmail.com"
    smtp_host: str | None = "smtp.gmail.com"
    daily_send_limit: int | None = Field(default=500, ge=1)
    max_recipients_per_message: int | None = Field(default=100, ge=1)
    max_message_bytes: int | None = Field(default=25 * MIB, ge=1)
    contact_initiated: bool = True


class OutlookSettings(ProviderSettings):
    """Microsoft identity platform v2 endpoints and Exchange Online limits."""

    authorize_url: str | None = "https://login.microsoftonline.com/common/oauth2/v2.0/authorize"
    token_url: str | None = "https://login.microsoftonline.com/common/oauth2/v2.0/token"  # noqa: S105
    userinfo_url: str | None = "https://graph.microsoft.com/oidc/userinfo"
    jwks_url: str | None = "https://login.microsoftonline.com/common/discovery/v2.0/keys"
    scopes: tuple[str, ...] = (
        "offline_access",
        "https://outlook.office.com/IMAP.AccessAsUser.All",
        "https://outlook.office.com/SMTP.Send",
        "openid",
        "email",
    )
    imap_host: str | None = "outlook.office365.com"
    smtp_host: str | None = "smtp.office365.com"
    max_attachment_bytes: int | None = Field(default=3 * MIB, ge=1)
    allowed_attachment_types: tuple[str, ...] | None = (
        "jpg",
        "jpeg",
        "png",
        "mp4",
        "mpeg",
        "zip",
        "rar",
        "pdf",
        "doc",
        "docx",
        "txt",
    )


class ProvidersSettings(_Section):
    """``[providers]``: one table per provider kind."""

    gmail: GmailSettings = Field(default_factory=GmailSettings)
    outlook: OutlookSettings = Field(default_factory=OutlookSettings)
    imap: ProviderSettings = Field(default_factory=ProviderSettings)


class RelaySettings(_Section):
    """``[relay]``: system smarthost for bulk, workflow and fallback mail (R16)."""

    host: str | None = None
    port: int = Field(default=587, ge=1, le=65535)
    security: Security = Security.STARTTLS
    username: str | None = None
    password: Secret | None = None
    ca_file: Path | None = None

    _check_ca = field_validator("ca_file")(_readable_file)


WebhookEvent = Literal["message.synced", "message.send_failed", "mailbox.state_changed"]


class WebhookSettings(_Section):
    """One ``[[webhooks]]`` entry: HMAC-SHA256-signed POSTs of ``events``."""

    url: str = Field(pattern=r"^https?://")
    secret: Secret
    events: tuple[WebhookEvent, ...] = Field(min_length=1)


class Settings(_Section):
    """The whole config file; every section optional, every key defaulted."""

    storage: StorageSettings = Field(default_factory=StorageSettings)
    smtp: SmtpSettings = Field(default_factory=SmtpSettings)
    bcc: BccSettings = Field(default_factory=BccSettings)
    http: HttpSettings = Field(default_factory=HttpSettings)
    security: SecuritySettings = Field(default_factory=SecuritySettings)
    sync: SyncSettings = Field(default_factory=SyncSettings)
    providers: ProvidersSettings = Field(default_factory=ProvidersSettings)
    relay: RelaySettings = Field(default_factory=RelaySettings)
    webhooks: tuple[WebhookSettings, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class ConfigIssue:
    """One config problem: ``key`` is the dotted TOML path ("" for the file)."""

    key: str
    message: str

    def __str__(self) -> str:
        return f"{self.key}: {self.message}" if self.key else self.message


class ConfigError(ValueError):
    """The config cannot be used; ``issues`` lists every problem found."""

    def __init__(self, issues: tuple[ConfigIssue, ...]) -> None:
        super().__init__("; ".join(str(i) for i in issues))
        self.issues = issues


def _dotted(loc: tuple[int | str, ...]) -> str:
    """Turn a pydantic location into ``a.b[0].c`` (TOML key path)."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


_MESSAGES = {
    "extra_forbidden": "unknown key",
    "missing": "required value missing",
}


def _message(err: Any) -> str:
    """Phrase one pydantic error the way an admin reads it."""
    kind, ctx = err["type"], err.get("ctx") or {}
    if kind in _MESSAGES:
        return _MESSAGES[kind]
    if kind == "greater_than_equal":
        return f"must be ≥ {ctx['ge']}"
    if kind == "less_than_equal":
        return f"must be ≤ {ctx['le']}"
    if kind.endswith(("_type", "_parsing")):
        return f"wrong type: {err['msg']}"
    return str(err["msg"]).removeprefix("Value error, ")


def _issues(exc: ValidationError) -> tuple[ConfigIssue, ...]:
    out = []
    for err in exc.errors(include_url=False):
        message = _message(err)
        out.append(ConfigIssue(key=_dotted(tuple(err["loc"])), message=message))
    return tuple(out)


def parse_settings(data: dict[str, Any]) -> Settings:
    """Validate a decoded TOML document.

    Raises:
        ConfigError: every problem, each naming its key path.
    """
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_issues(exc)) from None


def config_path(explicit: str | os.PathLike[str] | None) -> Path:
    """Return the config file to use: ``-c``, else ``$MAILGATE_CONFIG``, else the example."""
    if explicit:
        return Path(explicit)
    env = os.environ.get(CONFIG_ENV_VAR)
    return Path(env) if env else DEFAULT_CONFIG_PATH


def load_settings(path: Path) -> Settings:
    """Read and validate a TOML config file (TOML 1.0 via ``tomllib``).

    Raises:
        ConfigError: unreadable file, TOML syntax error, or invalid values.
    """
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        issue = ConfigIssue(key="", message=f"cannot read {path}: {exc.strerror}")
        raise ConfigError((issue,)) from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError((ConfigIssue(key="", message=f"not valid TOML: {exc}"),)) from None
    return parse_settings(data)


def make_settings(**sections: dict[str, Any]) -> Settings:
    """Build settings in code (tests): ``make_settings(smtp={"port": 0})``.

    Raises:
        ConfigError: as ``parse_settings``.
    """
    return parse_settings(dict(sections))

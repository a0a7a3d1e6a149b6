"""What the HTTP routes share: the services, the API keys, and the endpoint registry type.

Edge module: plain values, built once by ``gateway/app.py`` (or a test)
and passed to ``build_http_app``; no globals.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import Response

from gateway.config import Settings
from gateway.http.auth import ApiKeys, Principal
from gateway.mailboxes import MailboxService
from gateway.outbound import OutboundService
from storage.db import Database

Handler = Callable[[Request], Awaitable[Response]]


@dataclass(frozen=True, slots=True, kw_only=True)
class HttpContext:
    """The services behind the API and the settings page.

    Attributes:
        db: the database (``run`` / ``read`` sync repository functions).
        settings: the whole config (``http``, ``bcc.domain``, …).
        service: owns every mailbox state change (R19–R22).
        keys: the configured API keys.
        outbound: the CRM send queue; None leaves ``/api/v1/messages`` unmounted.
    """

    db: Database
    settings: Settings
    service: MailboxService
    keys: ApiKeys
    outbound: OutboundService | None = None

    def principal(self, request: Request) -> Principal:
        """Authenticate the request's API key (raises ``ApiError`` 401)."""
        return self.keys.authenticate(request)


@dataclass(frozen=True, slots=True, kw_only=True)
class Param:
    """A query or path parameter, for the OpenAPI document."""

    name: str
    where: str = "query"
    required: bool = False
    description: str = ""
    schema: dict[str, Any] = field(default_factory=lambda: {"type": "string"})


@dataclass(frozen=True, slots=True, kw_only=True)
class Endpoint:
    """One JSON route: path (Starlette syntax), method, handler and its OpenAPI description.

    Attributes:
        status: the success status (200, 201, 303 …).
        body: the request body model, or None.
        authenticated: whether it needs an API key (documented as bearer auth).
    """

    path: str
    method: str
    handler: Handler
    summary: str
    status: int = 200
    params: tuple[Param, ...] = ()
    body: type[BaseModel] | None = None
    authenticated: bool = True
    errors: tuple[int, ...] = ()

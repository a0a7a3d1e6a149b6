"""JSON routes of a user's mailbox: state, connect, update (R20), disconnect (R21), BCC address.

Edge module: authenticate, check the sub-account scope and the user's
membership, then call ``MailboxService``; the OAuth callback that finishes
a connect is in ``pages.py`` (a browser lands there). Errors become the
error body in ``errors.py`` (``not_connected`` → 503).
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from gateway.http.api import PREFIX, SUBACCOUNT_PARAM, path_int, scoped_subaccount, subaccount_ref
from gateway.http.context import Endpoint, HttpContext, Param
from gateway.http.errors import BAD_REQUEST, ApiError
from gateway.http.schemas import jsonable
from gateway.mailboxes import (
    NOT_CONNECTED,
    OAUTH_PROVIDERS,
    PURPOSE_CONNECT,
    PURPOSE_UPDATE,
    MailboxError,
    MailboxService,
)
from ingest.types import MailboxState, Provider
from storage.errors import NotFound
from storage.repos.directory import sync_address
from storage.repos.directory_reads import SubaccountView, get_user
from storage.repos.mailboxes import MailboxRecord, member_user_id

MAILBOX_NOT_FOUND = "mailbox_not_found"
PROVIDER_PARAM = Param(
    name="provider", description="gmail or outlook", schema={"enum": ["gmail", "outlook"]}
)


def mailbox_json(record: MailboxRecord) -> dict[str, Any]:
    """Return the public view of a mailbox: no credentials, no token expiry.

    ``sync_lag_seconds`` is a number ≥ 0 or null (nothing synced yet);
    its definition is in docs/imap.md "Sync lag".
    """
    return {
        "id": record.id,
        "user_id": record.user_id,
        "subaccount_id": record.subaccount_id,
        "provider": record.provider.value,
        "address": record.address,
        "state": record.state.value,
        "connected_at": jsonable(record.connected_at),
        "disconnected_at": jsonable(record.disconnected_at),
        "last_sync_at": jsonable(record.last_sync_at),
        "sync_lag_seconds": record.sync_lag_seconds,
        "last_error": record.last_error,
    }


async def latest_mailbox(
    service: MailboxService, user_id: int, subaccount_id: int
) -> MailboxRecord | None:
    """Return the user's active mailbox in the sub-account, else the newest one, else None."""
    current = await service.current(user_id, subaccount_id)
    if current is not None:
        return current
    every = await service.list(user_id=user_id, subaccount_id=subaccount_id)
    return every[-1] if every else None


def oauth_provider(raw: str | None, *, default: Provider | None = None) -> Provider:
    """Parse ``?provider=`` (``gmail`` | ``outlook``); raises ``ApiError`` 400."""
    if not raw and default is not None:
        return default
    try:
        provider = Provider(raw or "")
    except ValueError:
        provider = None
    if provider not in OAUTH_PROVIDERS:
        raise ApiError(400, BAD_REQUEST, "provider must be gmail or outlook", {"provider": raw})
    assert provider is not None  # noqa: S101 (narrowing for mypy)
    return provider


class MailboxRoutes:
    """Handlers of ``/api/v1/users/{user_id}/mailbox…`` and ``…/bcc-address``."""

    def __init__(self, ctx: HttpContext) -> None:
        self.ctx = ctx

    async def _member(self, request: Request) -> tuple[int, SubaccountView]:
        principal = self.ctx.principal(request)
        user_id = path_int(request, "user_id")
        sub = await scoped_subaccount(self.ctx, principal, subaccount_ref(request))
        await self.ctx.db.read(member_user_id, user_id, sub.id)
        return user_id, sub

    async def get_mailbox(self, request: Request) -> Response:
        user_id, sub = await self._member(request)
        record = await latest_mailbox(self.ctx.service, user_id, sub.id)
        if record is None:
            raise NotFound(f"user {user_id} has no mailbox in {sub.name!r}", code=MAILBOX_NOT_FOUND)
        return JSONResponse(mailbox_json(record))

    async def connect(self, request: Request) -> Response:
        user_id, sub = await self._member(request)
        provider = oauth_provider(request.query_params.get("provider"))
        auth = await self.ctx.service.start_authorization(
            user_id, sub.id, provider, purpose=PURPOSE_CONNECT
        )
        return JSONResponse(
            {"authorization_url": auth.url, "expires_at": jsonable(auth.expires_at)}
        )

    async def update(self, request: Request) -> Response:
        user_id, sub = await self._member(request)
        current = await self.ctx.service.current(user_id, sub.id)
        if current is None:
            raise MailboxError(NOT_CONNECTED, "no mailbox to update: connect one first")
        provider = oauth_provider(
            request.query_params.get("provider"),
            default=current.provider if current.provider in OAUTH_PROVIDERS else None,
        )
        auth = await self.ctx.service.start_authorization(
            user_id, sub.id, provider, purpose=PURPOSE_UPDATE
        )
        return JSONResponse(
            {"authorization_url": auth.url, "expires_at": jsonable(auth.expires_at)}
        )

    async def disconnect(self, request: Request) -> Response:
        user_id, sub = await self._member(request)
        current = await self.ctx.service.current(user_id, sub.id)
        if current is None or current.state == MailboxState.DISCONNECTED:
            raise MailboxError(NOT_CONNECTED, f"user {user_id} has no connected mailbox")
        return JSONResponse(mailbox_json(await self.ctx.service.disconnect(current.id)))

    async def bcc_address(self, request: Request) -> Response:
        user_id, sub = await self._member(request)

        def read(session: Any) -> str:
            user = get_user(session, user_id, self.ctx.settings.bcc.domain)
            return sync_address(session, user.email, sub.id, self.ctx.settings.bcc.domain)

        return JSONResponse(
            {"user_id": user_id, "subaccount_id": sub.id, "address": await self.ctx.db.read(read)}
        )


def mailbox_endpoints(ctx: HttpContext) -> tuple[Endpoint, ...]:
    """Return the mailbox endpoints of INTERFACE.md."""
    r = MailboxRoutes(ctx)
    user_id = Param(name="user_id", where="path", required=True, schema={"type": "integer"})
    base = PREFIX + "/users/{user_id}"
    params = (user_id, SUBACCOUNT_PARAM)
    return (
        Endpoint(
            path=base + "/mailbox",
            method="GET",
            handler=r.get_mailbox,
            summary="The user's mailbox: state, address, provider, last sync, sync lag, last error",
            params=params,
            errors=(400, 404),
        ),
        Endpoint(
            path=base + "/mailbox/connect",
            method="POST",
            handler=r.connect,
            summary="Start connecting Gmail or Outlook: returns the authorization URL (R19)",
            params=(*params, PROVIDER_PARAM),
            errors=(400, 404, 502),
        ),
        Endpoint(
            path=base + "/mailbox/update",
            method="POST",
            handler=r.update,
            summary="Update email: a second authorization that replaces the mailbox (R20)",
            params=(*params, PROVIDER_PARAM),
            errors=(400, 404, 503),
        ),
        Endpoint(
            path=base + "/mailbox/disconnect",
            method="POST",
            handler=r.disconnect,
            summary="Disconnect: tokens deleted and revoked, messages kept (R21)",
            params=params,
            errors=(404, 503),
        ),
        Endpoint(
            path=base + "/bcc-address",
            method="GET",
            handler=r.bcc_address,
            summary="The user's sync (BCC) address in the sub-account (R14)",
            params=params,
            errors=(404,),
        ),
    )

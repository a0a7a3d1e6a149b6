"""JSON routes for sub-accounts, users and contacts: create, read, list, simple update.

Edge module: authenticate (``auth.py``), check the sub-account scope,
validate the body (``schemas.py``), run one repository call in one
transaction, answer JSON. Errors propagate as exceptions and become the
error body in ``errors.py``; nothing is caught here.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from gateway.http.auth import Principal
from gateway.http.context import Endpoint, HttpContext, Param
from gateway.http.errors import BAD_REQUEST, FORBIDDEN, ApiError
from gateway.http.schemas import (
    ContactCreate,
    ContactUpdate,
    SubaccountCreate,
    UserCreate,
    UserUpdate,
    jsonable,
    parse_body,
)
from storage.repos.directory import add_contact, add_subaccount, add_user
from storage.repos.directory_reads import (
    SubaccountView,
    UserView,
    get_contact,
    get_subaccount,
    get_user,
    list_contacts,
    list_subaccounts,
    list_users,
    rename_contact,
    rename_user,
)

PREFIX = "/api/v1"
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000

SUBACCOUNT_PARAM = Param(
    name="subaccount", required=True, description="sub-account id or name (in the key's scope)"
)


MAX_ROW_ID = 2**63 - 1
"""Largest row key SQLite's INTEGER and PostgreSQL's BIGINT hold."""


def path_int(request: Request, name: str) -> int:
    """Return a numeric path parameter (raises ``ApiError`` 404 when not a number)."""
    value = str(request.path_params[name])
    # Row keys are 64-bit signed in both databases; a longer number names nothing.
    if not value.isdigit() or int(value) > MAX_ROW_ID:
        raise ApiError(404, "not_found", f"no {name.removesuffix('_id')} {value!r}")
    return int(value)


def query_int(request: Request, name: str, default: int, maximum: int) -> int:
    """Return a non-negative integer query parameter ≤ ``maximum``, or ``default`` (else 400)."""
    raw = request.query_params.get(name)
    if raw is None:
        return default
    if not raw.isdigit() or int(raw) > maximum:
        raise ApiError(400, BAD_REQUEST, f"{name} must be an integer from 0 to {maximum}")
    return int(raw)


def subaccount_ref(request: Request) -> str:
    """Return the required ``?subaccount=`` value (raises ``ApiError`` 400 when missing)."""
    ref = request.query_params.get("subaccount", "").strip()
    if not ref:
        raise ApiError(400, BAD_REQUEST, "the subaccount query parameter is required")
    return ref


async def scoped_subaccount(
    ctx: HttpContext, principal: Principal, ref: str | int
) -> SubaccountView:
    """Resolve a sub-account reference and check the key may use it (404, 403)."""
    sub = await ctx.db.read(get_subaccount, ref)
    principal.require(sub.id, sub.name)
    return sub


def _user_json(user: UserView, principal: Principal) -> dict[str, Any]:
    visible = [m for m in user.memberships if principal.allows(m.subaccount_id, m.subaccount_name)]
    if not visible:
        raise ApiError(403, FORBIDDEN, f"user {user.id} is in no sub-account this key may use")
    return {
        "id": user.id,
        "email": user.email,
        "name": user.name,
        "subaccounts": jsonable(visible),
    }


class DirectoryRoutes:
    """Handlers of ``/api/v1/subaccounts``, ``/api/v1/users`` and ``/api/v1/contacts``."""

    def __init__(self, ctx: HttpContext) -> None:
        self.ctx = ctx
        self.domain = ctx.settings.bcc.domain

    async def list_subaccounts(self, request: Request) -> Response:
        principal = self.ctx.principal(request)
        subs = await self.ctx.db.read(list_subaccounts)
        visible = [s for s in subs if principal.allows(s.id, s.name)]
        return JSONResponse({"subaccounts": jsonable(visible)})

    async def create_subaccount(self, request: Request) -> Response:
        principal = self.ctx.principal(request)
        principal.require_unrestricted()
        body = await parse_body(request, SubaccountCreate)
        new_id = await self.ctx.db.run(add_subaccount, body.name)
        sub = await self.ctx.db.read(get_subaccount, int(new_id))
        return JSONResponse(jsonable(sub), status_code=201)

    async def get_subaccount(self, request: Request) -> Response:
        principal = self.ctx.principal(request)
        sub = await scoped_subaccount(self.ctx, principal, path_int(request, "subaccount_id"))
        return JSONResponse(jsonable(sub))

    async def list_users(self, request: Request) -> Response:
        principal = self.ctx.principal(request)
        sub = await scoped_subaccount(self.ctx, principal, subaccount_ref(request))
        users = await self.ctx.db.read(list_users, sub.id, self.domain)
        return JSONResponse({"users": [_user_json(u, principal) for u in users]})

    async def create_user(self, request: Request) -> Response:
        principal = self.ctx.principal(request)
        body = await parse_body(request, UserCreate)
        subs = [await scoped_subaccount(self.ctx, principal, ref) for ref in body.subaccounts]
        user_id = await self.ctx.db.run(add_user, body.email, body.name, [s.id for s in subs])
        user = await self.ctx.db.read(get_user, int(user_id), self.domain)
        return JSONResponse(_user_json(user, principal), status_code=201)

    async def get_user(self, request: Request) -> Response:
        principal = self.ctx.principal(request)
        user = await self.ctx.db.read(get_user, path_int(request, "user_id"), self.domain)
        return JSONResponse(_user_json(user, principal))

    async def update_user(self, request: Request) -> Response:
        principal = self.ctx.principal(request)
        user_id = path_int(request, "user_id")
        _user_json(await self.ctx.db.read(get_user, user_id, self.domain), principal)
        body = await parse_body(request, UserUpdate)
        await self.ctx.db.run(rename_user, user_id, body.name)
        user = await self.ctx.db.read(get_user, user_id, self.domain)
        return JSONResponse(_user_json(user, principal))

    async def list_contacts(self, request: Request) -> Response:
        principal = self.ctx.principal(request)
        sub = await scoped_subaccount(self.ctx, principal, subaccount_ref(request))
        limit = query_int(request, "limit", DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        after = query_int(request, "after", 0, 2**62)
        rows = await self.ctx.db.read(list_contacts, sub.id, limit=limit, after_id=after)
        next_after = rows[-1].id if len(rows) == limit and rows else None
        return JSONResponse({"contacts": jsonable(rows), "next_after": next_after})

    async def create_contact(self, request: Request) -> Response:
        principal = self.ctx.principal(request)
        body = await parse_body(request, ContactCreate)
        sub = await scoped_subaccount(self.ctx, principal, body.subaccount)
        contact_id = await self.ctx.db.run(
            add_contact, sub.id, body.email, body.name, body.assigned_user_email
        )
        contact = await self.ctx.db.read(get_contact, int(contact_id))
        return JSONResponse(jsonable(contact), status_code=201)

    async def get_contact(self, request: Request) -> Response:
        principal = self.ctx.principal(request)
        contact = await self.ctx.db.read(get_contact, path_int(request, "contact_id"))
        await scoped_subaccount(self.ctx, principal, contact.subaccount_id)
        return JSONResponse(jsonable(contact))

    async def update_contact(self, request: Request) -> Response:
        principal = self.ctx.principal(request)
        contact_id = path_int(request, "contact_id")
        contact = await self.ctx.db.read(get_contact, contact_id)
        await scoped_subaccount(self.ctx, principal, contact.subaccount_id)
        body = await parse_body(request, ContactUpdate)
        await self.ctx.db.run(rename_contact, contact_id, body.name)
        return JSONResponse(jsonable(await self.ctx.db.read(get_contact, contact_id)))


def directory_endpoints(ctx: HttpContext) -> tuple[Endpoint, ...]:
    """Return the directory endpoints (INTERFACE.md: create / read / update / list)."""
    r = DirectoryRoutes(ctx)
    sub_id = Param(name="subaccount_id", where="path", required=True, schema={"type": "integer"})
    user_id = Param(name="user_id", where="path", required=True, schema={"type": "integer"})
    contact_id = Param(name="contact_id", where="path", required=True, schema={"type": "integer"})
    paging = (
        Param(name="limit", schema={"type": "integer", "maximum": MAX_PAGE_SIZE}),
        Param(name="after", description="last contact id seen", schema={"type": "integer"}),
    )
    subs, users, contacts = f"{PREFIX}/subaccounts", f"{PREFIX}/users", f"{PREFIX}/contacts"
    return (
        Endpoint(path=subs, method="GET", handler=r.list_subaccounts, summary="List sub-accounts"),
        Endpoint(
            path=subs,
            method="POST",
            handler=r.create_subaccount,
            summary="Create a sub-account (keys scoped to all sub-accounts only)",
            status=201,
            body=SubaccountCreate,
            errors=(409, 422),
        ),
        Endpoint(
            path=subs + "/{subaccount_id}",
            method="GET",
            handler=r.get_subaccount,
            summary="Read a sub-account",
            params=(sub_id,),
            errors=(404,),
        ),
        Endpoint(
            path=users,
            method="GET",
            handler=r.list_users,
            summary="List the users of a sub-account",
            params=(SUBACCOUNT_PARAM,),
            errors=(400, 404),
        ),
        Endpoint(
            path=users,
            method="POST",
            handler=r.create_user,
            summary="Create a user (or add memberships to an existing address)",
            status=201,
            body=UserCreate,
            errors=(404, 422),
        ),
        Endpoint(
            path=users + "/{user_id}",
            method="GET",
            handler=r.get_user,
            summary="Read a user with sync (BCC) addresses",
            params=(user_id,),
            errors=(404,),
        ),
        Endpoint(
            path=users + "/{user_id}",
            method="PATCH",
            handler=r.update_user,
            summary="Rename a user",
            params=(user_id,),
            body=UserUpdate,
            errors=(404, 422),
        ),
        Endpoint(
            path=contacts,
            method="GET",
            handler=r.list_contacts,
            summary="List the contacts of a sub-account, by id",
            params=(SUBACCOUNT_PARAM, *paging),
            errors=(400, 404),
        ),
        Endpoint(
            path=contacts,
            method="POST",
            handler=r.create_contact,
            summary="Create a contact (R10: one per address)",
            status=201,
            body=ContactCreate,
            errors=(404, 409, 422),
        ),
        Endpoint(
            path=contacts + "/{contact_id}",
            method="GET",
            handler=r.get_contact,
            summary="Read a contact",
            params=(contact_id,),
            errors=(404,),
        ),
        Endpoint(
            path=contacts + "/{contact_id}",
            method="PATCH",
            handler=r.update_contact,
            summary="Rename a contact",
            params=(contact_id,),
            body=ContactUpdate,
            errors=(404, 422),
        ),
    )

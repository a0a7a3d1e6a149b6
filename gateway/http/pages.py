"""The "Email (2-way sync)" settings page and the OAuth callback a browser lands on.

Edge module: server-rendered HTML (Jinja2, autoescaped) for a user signed in
by a signed session cookie (Starlette's ``SessionMiddleware``, itsdangerous
HMAC). Every POST form carries a per-session CSRF token (OWASP
synchronizer-token pattern); the OAuth ``state`` (RFC 6749 §10.12) guards
the callback. It calls ``MailboxService`` and never touches tokens.

Flow::

    GET /settings/login?token=…  → session {user_id, subaccount_id, csrf} → 303 /settings/email
    POST /settings/email/connect → 303 provider consent → GET /oauth/callback
      → finish_authorization → flash → 303 /settings/email   (JSON if asked: Accept)
"""

from __future__ import annotations

import hmac
import secrets
import urllib.parse
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from gateway.http.api_mailbox import latest_mailbox, mailbox_json, oauth_provider
from gateway.http.context import HttpContext
from gateway.http.errors import (
    CSRF_FAILED,
    SETTINGS_DISABLED,
    UNAUTHENTICATED,
    ApiError,
    describe,
    error_response,
)
from gateway.http.signin import LOGIN_PATH, InvalidSignIn, SettingsDisabled, check_token
from gateway.mailboxes import CALLBACK_PATH, PURPOSE_CONNECT, PURPOSE_UPDATE
from ingest.types import MailboxState, Provider
from storage.repos.directory_reads import get_user

SETTINGS_PATH = "/settings/email"
CONNECT_PATH = SETTINGS_PATH + "/connect"
UPDATE_PATH = SETTINGS_PATH + "/update"
DISCONNECT_PATH = SETTINGS_PATH + "/disconnect"

STATE_NOT_CONNECTED = "not connected"
"""Shown in ``#mailbox-state`` when the user never connected a mailbox here."""
PROVIDER_NAMES = {Provider.GMAIL.value: "Gmail", Provider.OUTLOOK.value: "Outlook", "imap": "IMAP"}
PROVIDER_CHOICES = ((Provider.GMAIL.value, "Gmail"), (Provider.OUTLOOK.value, "Outlook"))
CSRF_BYTES = 32
MAX_FORM_BYTES = 4096

TEMPLATES = Environment(
    loader=FileSystemLoader(Path(__file__).parent / "templates"),
    autoescape=select_autoescape(default=True, default_for_string=True),
    auto_reload=False,
)


def wants_json(request: Request) -> bool:
    """Whether the client asked for JSON rather than a page (``Accept`` header)."""
    accept = request.headers.get("accept", "").lower()
    return "application/json" in accept and "text/html" not in accept


def _security_headers(nonce: str) -> dict[str, str]:
    csp = (
        f"default-src 'none'; style-src 'nonce-{nonce}'; script-src 'nonce-{nonce}'; "
        "img-src 'self'; base-uri 'none'; frame-ancestors 'none'"
    )
    return {
        "Content-Security-Policy": csp,
        "Cache-Control": "no-store",
        "Referrer-Policy": "same-origin",
        "X-Content-Type-Options": "nosniff",
    }


def render(template: str, status: int = 200, **values: Any) -> HTMLResponse:
    """Render an autoescaped template with a fresh CSP nonce for its inline style and script."""
    nonce = secrets.token_urlsafe(16)
    html = TEMPLATES.get_template(template).render(nonce=nonce, **values)
    return HTMLResponse(html, status_code=status, headers=_security_headers(nonce))


def message_page(status: int, heading: str, message: str) -> HTMLResponse:
    """A plain page saying what happened (errors outside the signed-in page)."""
    return render("message.html", status, heading=heading, message=message, flash=None)


def flash(request: Request, kind: str, text: str) -> None:
    """Keep a one-time message (``success`` or ``error``) for the next page view."""
    if "session" in request.scope:
        request.session["flash"] = {"kind": kind, "text": text}


def back_to_settings() -> RedirectResponse:
    """303 See Other to the settings page (RFC 9110 §15.4.4: the browser GETs it)."""
    return RedirectResponse(SETTINGS_PATH, status_code=303)


async def read_form(request: Request) -> dict[str, str]:
    """Parse an ``application/x-www-form-urlencoded`` body (HTML §4.10.21.7); last value wins."""
    body = await request.body()
    if len(body) > MAX_FORM_BYTES:
        raise ApiError(413, "too_large", "form too large")
    return dict(urllib.parse.parse_qsl(body.decode("utf-8", "replace"), max_num_fields=20))


class SettingsPages:
    """Handlers of ``/settings/*`` and ``/oauth/callback``."""

    def __init__(self, ctx: HttpContext, *, enabled: bool) -> None:
        self.ctx = ctx
        self.enabled = enabled

    def _signed_in(self, request: Request) -> tuple[int, int] | None:
        if not self.enabled:
            return None
        session = request.session
        if "user_id" not in session or "subaccount_id" not in session:
            return None
        return int(session["user_id"]), int(session["subaccount_id"])

    def _disabled(self) -> Response:
        return error_response(503, SETTINGS_DISABLED, "http.session_secret is not set")

    async def login(self, request: Request) -> Response:
        if not self.enabled:
            return self._disabled()
        try:
            sign_in = check_token(self.ctx.settings, request.query_params.get("token", ""))
            await self.ctx.db.read(get_user, sign_in.user_id, self.ctx.settings.bcc.domain)
        except (InvalidSignIn, SettingsDisabled) as exc:
            return message_page(401, "Sign-in failed", str(exc))
        request.session.clear()
        request.session.update(
            user_id=sign_in.user_id,
            subaccount_id=sign_in.subaccount_id,
            csrf=secrets.token_urlsafe(CSRF_BYTES),
        )
        return back_to_settings()

    async def settings_page(self, request: Request) -> Response:
        if not self.enabled:
            return self._disabled()
        who = self._signed_in(request)
        if who is None:
            note = request.session.pop("flash", None)
            text = note["text"] + " " if note else ""
            return message_page(401, "Sign in", text + "Open the sign-in link from your CRM.")
        user_id, sub_id = who
        mailbox = await latest_mailbox(self.ctx.service, user_id, sub_id)
        user = await self.ctx.db.read(get_user, user_id, self.ctx.settings.bcc.domain)
        bcc = next((m.sync_address for m in user.memberships if m.subaccount_id == sub_id), "")
        state = mailbox.state.value if mailbox else STATE_NOT_CONNECTED
        active = mailbox is not None and mailbox.state != MailboxState.DISCONNECTED
        return render(
            "settings_email.html",
            flash=request.session.pop("flash", None),
            mailbox=mailbox,
            active=active,
            reauth=mailbox is not None and mailbox.state == MailboxState.REAUTH_REQUIRED,
            state_text=state.replace("_", " "),
            state_class=state.replace(" ", "-"),
            provider_names=PROVIDER_NAMES,
            providers=PROVIDER_CHOICES,
            bcc_address=bcc,
            csrf=request.session.get("csrf", ""),
            connect_path=CONNECT_PATH,
            update_path=UPDATE_PATH,
            disconnect_path=DISCONNECT_PATH,
        )

    async def _checked_form(self, request: Request) -> tuple[tuple[int, int], dict[str, str]]:
        who = self._signed_in(request)
        if who is None:
            raise ApiError(401, UNAUTHENTICATED, "sign in first")
        form = await read_form(request)
        expected = str(request.session.get("csrf", ""))
        if not expected or not hmac.compare_digest(expected, form.get("csrf", "")):
            raise ApiError(403, CSRF_FAILED, "the form is stale: reload the page and try again")
        return who, form

    async def _authorize(self, request: Request, purpose: str) -> Response:
        if not self.enabled:
            return self._disabled()
        try:
            (user_id, sub_id), form = await self._checked_form(request)
            provider = oauth_provider(form.get("provider"))
            auth = await self.ctx.service.start_authorization(
                user_id, sub_id, provider, purpose=purpose
            )
        except Exception as exc:  # every failure is shown to the user on the page
            return self._failed(request, exc)
        return RedirectResponse(auth.url, status_code=303)

    async def connect(self, request: Request) -> Response:
        return await self._authorize(request, PURPOSE_CONNECT)

    async def update(self, request: Request) -> Response:
        return await self._authorize(request, PURPOSE_UPDATE)

    async def disconnect(self, request: Request) -> Response:
        if not self.enabled:
            return self._disabled()
        try:
            (user_id, sub_id), _ = await self._checked_form(request)
            current = await self.ctx.service.current(user_id, sub_id)
            if current is not None:
                await self.ctx.service.disconnect(current.id)
        except Exception as exc:  # shown to the user on the page
            return self._failed(request, exc)
        flash(request, "success", "Mailbox disconnected. Your messages are kept.")
        return back_to_settings()

    def _failed(self, request: Request, exc: Exception) -> Response:
        error = describe(exc)
        if error.status in (401, 403) or not self.enabled:
            return message_page(error.status, "Not allowed", error.message)
        flash(request, "error", error.message)
        return back_to_settings()

    async def oauth_callback(self, request: Request) -> Response:
        """RFC 6749 §4.1.2: finish the authorization named by ``state``."""
        query = request.query_params
        try:
            record = await self.ctx.service.finish_authorization(
                query.get("state", ""), code=query.get("code"), error=query.get("error")
            )
        except Exception as exc:  # answered as JSON or shown on the page
            error = describe(exc)
            if wants_json(request):
                return error_response(error.status, error.code, error.message, error.details)
            if not self.enabled:
                return message_page(error.status, "Connecting failed", error.message)
            flash(request, "error", f"Connecting failed: {error.message}")
            return back_to_settings()
        if wants_json(request):
            return JSONResponse({"mailbox": mailbox_json(record)})
        if not self.enabled:
            return message_page(200, "Connected", f"{record.address} is connected.")
        flash(request, "success", f"Connected {record.address}.")
        return back_to_settings()


def page_routes(ctx: HttpContext, *, enabled: bool) -> list[Route]:
    """Return the routes of the settings page and the OAuth callback."""
    pages = SettingsPages(ctx, enabled=enabled)
    return [
        Route(LOGIN_PATH, pages.login, methods=["GET"]),
        Route(SETTINGS_PATH, pages.settings_page, methods=["GET"]),
        Route(CONNECT_PATH, pages.connect, methods=["POST"]),
        Route(UPDATE_PATH, pages.update, methods=["POST"]),
        Route(DISCONNECT_PATH, pages.disconnect, methods=["POST"]),
        Route(CALLBACK_PATH, pages.oauth_callback, methods=["GET"]),
    ]

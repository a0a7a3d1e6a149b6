"""The HTTP error body and the mapping from exceptions to statuses (INTERFACE.md "HTTP API").

Every error the API returns is ``{"error": {"code", "message", "details"}}``
with a fitting status. ``code`` is a stable machine name (the
``MailboxError`` / ``StorageError`` codes, or one of the constants below);
``message`` is for people and never holds exception tracebacks, tokens or
secrets. No routing here: ``app.py`` installs ``EXCEPTION_HANDLERS``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from pydantic import ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from gateway import mailboxes as mb
from gateway import outbound as ob
from gateway.secrets import MissingTokenKey
from ingest.limits import LimitCode
from storage.errors import Conflict, NotFound, StorageError
from storage.repos.oauth_states import StateRejected

log = logging.getLogger(__name__)

# Codes of errors raised by the HTTP layer itself.
UNAUTHENTICATED = "unauthenticated"
FORBIDDEN = "forbidden"
NOT_FOUND = "not_found"
VALIDATION_FAILED = "validation_failed"
BAD_REQUEST = "bad_request"
TOKEN_KEY_MISSING = "token_key_missing"  # noqa: S105 (an error code)
SETTINGS_DISABLED = "settings_disabled"
CSRF_FAILED = "csrf_failed"
TOO_LARGE = "too_large"
INTERNAL = "internal_error"

MAILBOX_STATUS: Mapping[str, int] = {
    mb.ACCESS_DENIED: 400,
    mb.BAD_REQUEST: 400,
    mb.IDENTITY_NOT_VERIFIED: 400,
    mb.LOGIN_FAILED: 400,
    mb.PROVIDER_ERROR: 502,
    mb.PROVIDER_UNAVAILABLE: 503,
    mb.NOT_CONNECTED: 503,
    mb.REAUTH_REQUIRED: 503,
    mb.WRONG_KIND: 409,
}
"""Status of each ``MailboxError`` code; unknown codes answer 400."""

SEND_STATUS: Mapping[str, int] = {
    LimitCode.QUOTA_EXCEEDED: 429,  # with Retry-After (api_messages.refusal_response)
    LimitCode.TOO_MANY_RECIPIENTS: 400,
    LimitCode.MESSAGE_TOO_LARGE: 413,
    LimitCode.ATTACHMENT_TOO_LARGE: 413,
    LimitCode.ATTACHMENT_TYPE_NOT_ALLOWED: 415,
    ob.MAILBOX_NOT_CONNECTED: 503,
    ob.RELAY_NOT_CONFIGURED: 503,
    ob.CONTACT_NOT_FOUND: 422,
}
"""Status of a send refused before any attempt (R17, R21; ``SendRejected`` codes too)."""

HTTP_CODES: Mapping[int, str] = {
    400: BAD_REQUEST,
    401: UNAUTHENTICATED,
    403: FORBIDDEN,
    404: NOT_FOUND,
    405: "method_not_allowed",
    409: "conflict",
    422: VALIDATION_FAILED,
}


RETRY_AFTER_SECONDS = 30
STATUS_HEADERS: Mapping[int, Mapping[str, str]] = {
    401: {"WWW-Authenticate": 'Bearer realm="mailgate"'},  # RFC 6750 §3
    503: {"Retry-After": str(RETRY_AFTER_SECONDS)},
}


class ApiError(Exception):
    """An error answer decided by a route: status, stable code, message, optional details."""

    def __init__(
        self, status: int, code: str, message: str, details: Mapping[str, Any] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = dict(details or {})


def error_response(
    status: int,
    code: str,
    message: str,
    details: Mapping[str, Any] | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    """Return the INTERFACE.md error body ``{"error": {"code", "message", "details"}}``."""
    body = {"error": {"code": code, "message": message, "details": dict(details or {})}}
    return JSONResponse(body, status_code=status, headers=dict(headers or {}))


def describe(exc: Exception) -> ApiError:
    """Map a known exception to its ``ApiError`` (status, code, message).

    ``StateRejected`` → 400 with its code; ``NotFound`` → 404; ``Conflict``
    → 409; other storage errors → 400; ``MailboxError`` → ``MAILBOX_STATUS``;
    ``SendRejected`` → ``SEND_STATUS`` (422 by default);
    pydantic ``ValidationError`` → 422 with ``details.errors``;
    ``MissingTokenKey`` → 503. Anything else → 500 ``internal_error``
    (the text is not shown). Other ``ValueError`` (a repository refusing a
    malformed value) → 422.
    """
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, StateRejected):
        return ApiError(400, exc.code, str(exc))
    if isinstance(exc, NotFound):
        return ApiError(404, exc.code, str(exc))
    if isinstance(exc, Conflict):
        return ApiError(409, exc.code, str(exc))
    if isinstance(exc, StorageError):
        return ApiError(400, exc.code, str(exc))
    if isinstance(exc, mb.MailboxError):
        return ApiError(MAILBOX_STATUS.get(exc.code, 400), exc.code, str(exc))
    if isinstance(exc, ob.SendRejected):
        return ApiError(SEND_STATUS.get(exc.code, 422), exc.code, str(exc))
    if isinstance(exc, ValidationError):
        errors = [
            {"loc": [str(p) for p in e["loc"]], "message": e["msg"], "type": e["type"]}
            for e in exc.errors(include_url=False, include_input=False)
        ]
        return ApiError(422, VALIDATION_FAILED, "request body is not valid", {"errors": errors})
    if isinstance(exc, ValueError):  # repositories reject malformed values (not one address)
        return ApiError(422, VALIDATION_FAILED, str(exc))
    if isinstance(exc, MissingTokenKey):
        return ApiError(503, TOKEN_KEY_MISSING, "security.token_key is not configured")
    return ApiError(500, INTERNAL, "internal error")


async def handle_exception(_: Request, exc: Exception) -> Response:
    """Starlette exception handler: the error body for every known exception."""
    error = describe(exc)
    if error.status >= 500 and error.code == INTERNAL:
        log.error("request failed", exc_info=exc)
    headers = STATUS_HEADERS.get(error.status)
    return error_response(error.status, error.code, error.message, error.details, headers)


async def handle_http_exception(_: Request, exc: Exception) -> Response:
    """Starlette's own 404/405 answers, in the error body."""
    assert isinstance(exc, HTTPException)  # noqa: S101 (registered for HTTPException only)
    code = HTTP_CODES.get(exc.status_code, "http_error")
    return error_response(exc.status_code, code, str(exc.detail), headers=exc.headers)


EXCEPTION_HANDLERS: Mapping[Any, Callable[[Request, Exception], Any]] = {
    HTTPException: handle_http_exception,
    ApiError: handle_exception,
    StorageError: handle_exception,
    mb.MailboxError: handle_exception,
    ob.SendRejected: handle_exception,
    ValidationError: handle_exception,
    ValueError: handle_exception,
    MissingTokenKey: handle_exception,
    Exception: handle_exception,
}
"""Installed on the Starlette app by ``build_http_app``."""

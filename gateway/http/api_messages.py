"""JSON routes of CRM sends: ``POST /api/v1/messages`` (queue a send) and ``GET …/{id}`` (its row).

Edge module: authenticate, check the sub-account scope, validate the body
(base64 attachments, ``extra="forbid"``), honour ``Idempotency-Key``, then
call ``OutboundService.enqueue``; the first attempt runs after the 202 is
sent (a Starlette background task), and ``process_due`` retries as usual.
It does not compose, judge limits or talk SMTP. A send refused up front is
still kept as a ``failed`` row (R17, R21) and answered with the status of
``errors.SEND_STATUS`` (429 carries ``Retry-After``); docs/sending.md "HTTP".
"""

from __future__ import annotations

import base64
import binascii
import logging
import math
from datetime import UTC, datetime
from typing import Annotated, Any, Self

from pydantic import BeforeValidator, Field, StringConstraints, ValidationError, model_validator
from pydantic.json_schema import WithJsonSchema
from sqlalchemy.exc import IntegrityError
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from gateway.http.api import PREFIX, path_int, scoped_subaccount
from gateway.http.context import Endpoint, HttpContext, Param
from gateway.http.errors import (
    SEND_STATUS,
    STATUS_HEADERS,
    TOO_LARGE,
    ApiError,
    error_response,
)
from gateway.http.schemas import (
    JSON_TYPE,
    UNSUPPORTED_MEDIA_TYPE,
    Body,
    Email,
    SubaccountRef,
    jsonable,
)
from gateway.outbound import OutboundService, SendRequest
from ingest.compose import OutgoingAttachment
from ingest.types import MessageId
from storage.models.enums import OutboundKind, OutboundState
from storage.repos import outbound as repo
from storage.repos.mailboxes import member_user_id

log = logging.getLogger(__name__)

MESSAGES_PATH = PREFIX + "/messages"
IDEMPOTENCY_HEADER = "Idempotency-Key"
MAX_IDEMPOTENCY_KEY_CHARS = 255
IDEMPOTENCY_KEY_REUSED = "idempotency_key_reused"
MALFORMED_JSON = "malformed_json"
MIB = 1024 * 1024
MAX_BODY_BYTES = 64 * MIB
"""Largest request body read: a 35 MiB Outlook message in base64 (≈ 47 MiB) plus the JSON."""
MAX_RECIPIENTS_FIELD = 1000
"""Schema cap on ``to`` + ``cc`` entries each; R17's per-provider cap (400) is stricter."""

NoLineBreak = StringConstraints(pattern=r"^[^\r\n]*$")
HeaderText = Annotated[str, NoLineBreak, StringConstraints(max_length=998)]
Address = Annotated[Email, NoLineBreak]
Filename = Annotated[
    str, NoLineBreak, StringConstraints(strip_whitespace=True, min_length=1, max_length=255)
]
ContentType = Annotated[
    str, StringConstraints(strip_whitespace=True, pattern=r"^[\w.+-]+/[\w.+-]+$", max_length=127)
]
MessageIdText = Annotated[
    str, StringConstraints(strip_whitespace=True, pattern=r"^<?[^<>\s@]+@[^<>\s@]+>?$")
]


def decode_base64(value: Any) -> bytes:
    """Decode standard base64 (RFC 4648 §4) strictly: a stray character is an error, not dropped.

    Raises:
        ValueError: not a string, or not valid base64 (pydantic reports it as 422).
    """
    if not isinstance(value, str):
        raise ValueError("content_base64 must be a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except binascii.Error as exc:
        raise ValueError(f"content_base64 is not valid base64: {exc}") from exc


Base64Content = Annotated[
    bytes,
    BeforeValidator(decode_base64),
    WithJsonSchema({"type": "string", "contentEncoding": "base64"}),
]


class AttachmentBody(Body):
    """One attachment of ``POST /api/v1/messages``: decoded bytes, name and media type."""

    filename: Filename
    content_type: ContentType
    content_base64: Base64Content


class MessageCreate(Body):
    """``POST /api/v1/messages``: the fields of ``mailgate send`` (INTERFACE.md).

    ``user`` is the CRM user's login email or id; ``to[0]`` is the contact of
    an individual send; ``in_reply_to`` is a Message-ID with or without the
    angle brackets. At least one of ``text`` and ``html`` is required.
    """

    user: Email | int
    subaccount: SubaccountRef
    to: tuple[Address, ...] = Field(min_length=1, max_length=MAX_RECIPIENTS_FIELD)
    cc: tuple[Address, ...] = Field(default=(), max_length=MAX_RECIPIENTS_FIELD)
    subject: HeaderText
    text: str | None = None
    html: str | None = None
    attachments: tuple[AttachmentBody, ...] = ()
    kind: OutboundKind = OutboundKind.INDIVIDUAL
    in_reply_to: MessageIdText | None = None

    @model_validator(mode="after")
    def _has_content(self) -> Self:
        if self.text is None and self.html is None:
            raise ValueError("give text or html (or both)")
        return self


def send_request(body: MessageCreate, subaccount_id: int, key: str | None) -> SendRequest:
    """Return the service request of a validated body (sub-account already resolved)."""
    return SendRequest(
        user=body.user,
        subaccount=subaccount_id,
        to=body.to,
        cc=body.cc,
        subject=body.subject,
        text=body.text,
        html=body.html,
        attachments=tuple(
            OutgoingAttachment(
                filename=a.filename, content_type=a.content_type, payload=a.content_base64
            )
            for a in body.attachments
        ),
        kind=body.kind,
        in_reply_to=MessageId(body.in_reply_to.strip("<>")) if body.in_reply_to else None,
        idempotency_key=key,
    )


def idempotency_key(request: Request) -> str | None:
    """Return the ``Idempotency-Key`` header (1–255 visible ASCII characters), or None.

    Raises:
        ApiError: 400 ``bad_request`` when present but empty, too long or not visible ASCII.
    """
    raw = request.headers.get(IDEMPOTENCY_HEADER)
    if raw is None:
        return None
    key = raw.strip()
    if not 0 < len(key) <= MAX_IDEMPOTENCY_KEY_CHARS or not all(" " < c <= "~" for c in key):
        raise ApiError(
            400,
            "bad_request",
            f"{IDEMPOTENCY_HEADER}: 1 to {MAX_IDEMPOTENCY_KEY_CHARS} visible ASCII characters",
        )
    return key


async def read_message_body(request: Request, limit_bytes: int = MAX_BODY_BYTES) -> MessageCreate:
    """Read at most ``limit_bytes`` of JSON and validate it as ``MessageCreate``.

    Raises:
        ApiError: 415 for a non-JSON Content-Type; 413 ``too_large`` over the
            limit (checked on Content-Length, then while reading); 400
            ``malformed_json`` when the body is not JSON.
        pydantic.ValidationError: well-formed JSON with invalid fields (→ 422).
    """
    content_type = request.headers.get("content-type", JSON_TYPE).split(";")[0].strip().lower()
    if content_type != JSON_TYPE and not content_type.endswith("+json"):
        raise ApiError(415, UNSUPPORTED_MEDIA_TYPE, f"send {JSON_TYPE}, not {content_type}")
    too_large = ApiError(413, TOO_LARGE, f"the body is over {limit_bytes} bytes")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit_bytes:
        raise too_large
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit_bytes:
            raise too_large
        chunks.append(chunk)
    try:
        return MessageCreate.model_validate_json(b"".join(chunks) or b"null")
    except ValidationError as exc:
        if any(e["type"] == "json_invalid" for e in exc.errors()):
            raise ApiError(400, MALFORMED_JSON, "the body is not JSON") from None
        raise


def accepted_json(record: repo.OutboundRecord) -> dict[str, Any]:
    """Return the answer to a queued send: ``{id, message_id, state}``."""
    return {"id": record.id, "message_id": record.message_id, "state": record.state.value}


def outbound_json(record: repo.OutboundRecord) -> dict[str, Any]:
    """Return the public view of a send (no blob digest, no idempotency key)."""
    return {
        **accepted_json(record),
        "provider_message_id": record.provider_message_id,
        "user_id": record.user_id,
        "subaccount_id": record.subaccount_id,
        "mailbox_id": record.mailbox_id,
        "contact_id": record.contact_id,
        "kind": record.kind.value,
        "route": record.route,
        "recipients": list(record.recipients),
        "subject": record.subject,
        "attempts": record.attempts,
        "next_attempt_at": jsonable(record.next_attempt_at),
        "error": record.error_code,
        "error_message": record.last_error,
        "last_reply": record.last_reply,
        "resets_at": jsonable(record.resets_at),
        "sent_at": jsonable(record.sent_at),
        "message_pk": record.message_pk,
        "created_at": jsonable(record.created_at),
    }


def refusal_response(record: repo.OutboundRecord, now: datetime) -> Response | None:
    """Return the error answer of a send refused up front, or None when it was not refused.

    The status comes from ``SEND_STATUS``; a quota refusal (429) carries
    ``Retry-After`` = whole seconds until ``resets_at`` (RFC 9110 §10.2.3)
    and ``details.resets_at``; 503 carries the usual ``Retry-After``.
    """
    code = record.error_code or ""
    if record.state != OutboundState.FAILED or code not in SEND_STATUS:
        return None
    status = SEND_STATUS[code]
    details: dict[str, Any] = {"id": record.id, "message_id": record.message_id, "state": "failed"}
    headers = dict(STATUS_HEADERS.get(status, {}))
    if record.resets_at is not None:
        details["resets_at"] = jsonable(record.resets_at)
        wait = math.ceil((record.resets_at - now).total_seconds())
        headers["Retry-After"] = str(max(0, wait))
    return error_response(status, code, record.last_error or code, details, headers)


class MessageRoutes:
    """Handlers of ``/api/v1/messages``."""

    def __init__(self, ctx: HttpContext, outbound: OutboundService) -> None:
        self.ctx = ctx
        self.outbound = outbound

    async def create_message(self, request: Request) -> Response:
        principal = self.ctx.principal(request)
        key = idempotency_key(request)
        body = await read_message_body(request)
        sub = await scoped_subaccount(self.ctx, principal, body.subaccount)
        if key is not None:
            existing = await self.ctx.db.read(repo.find_by_idempotency_key, key)
            if existing is not None:
                return await self._replay(existing, body, sub.id)
        try:
            record = await self.outbound.enqueue(send_request(body, sub.id, key))
        except IntegrityError:  # a concurrent request with the same key won the insert
            if key is None:
                raise
            existing = await self.ctx.db.read(repo.find_by_idempotency_key, key)
            if existing is None:
                raise
            return await self._replay(existing, body, sub.id)
        refused = refusal_response(record, datetime.now(UTC))
        if refused is not None:
            return refused
        return JSONResponse(
            accepted_json(record),
            status_code=202,
            headers={"Location": f"{MESSAGES_PATH}/{record.id}"},
            background=BackgroundTask(self._first_attempt, record.id),
        )

    async def _replay(
        self, record: repo.OutboundRecord, body: MessageCreate, subaccount_id: int
    ) -> Response:
        """Answer a repeated ``Idempotency-Key`` as the first request was answered; send nothing."""
        user_id = await self.ctx.db.read(member_user_id, body.user, subaccount_id)
        if (record.subaccount_id, record.user_id) != (subaccount_id, user_id):
            raise ApiError(
                409,
                IDEMPOTENCY_KEY_REUSED,
                f"this {IDEMPOTENCY_HEADER} was used for another user or sub-account",
            )
        refused = refusal_response(record, datetime.now(UTC))
        if refused is not None:
            return refused
        return JSONResponse(
            accepted_json(record), headers={"Location": f"{MESSAGES_PATH}/{record.id}"}
        )

    async def _first_attempt(self, outbound_id: int) -> None:
        """Attempt the send once, after the 202 went out; later ones are ``process_due``'s."""
        try:
            await self.outbound.process(outbound_id)
        except Exception:  # the row stays queued/sending: the scheduler or reconcile settles it
            log.exception("first send attempt failed", extra={"outbound_id": outbound_id})

    async def get_message(self, request: Request) -> Response:
        principal = self.ctx.principal(request)
        record = await self.ctx.db.read(repo.get_outbound, path_int(request, "outbound_id"))
        await scoped_subaccount(self.ctx, principal, record.subaccount_id)
        return JSONResponse(outbound_json(record))


def message_endpoints(ctx: HttpContext) -> tuple[Endpoint, ...]:
    """Return the send endpoints, or none when the context has no ``OutboundService``."""
    if ctx.outbound is None:
        return ()
    r = MessageRoutes(ctx, ctx.outbound)
    outbound_id = Param(name="outbound_id", where="path", required=True, schema={"type": "integer"})
    key = Param(
        name=IDEMPOTENCY_HEADER,
        where="header",
        description="a retried request with the same key returns the first send (200)",
    )
    return (
        Endpoint(
            path=MESSAGES_PATH,
            method="POST",
            handler=r.create_message,
            summary="Send from the CRM (R1, R16, R17, R21): 202 {id, message_id, state}; "
            "refusals are kept as failed sends",
            status=202,
            params=(key,),
            body=MessageCreate,
            errors=(400, 404, 409, 413, 415, 422, 429, 503),
        ),
        Endpoint(
            path=MESSAGES_PATH + "/{outbound_id}",
            method="GET",
            handler=r.get_message,
            summary="A CRM send: state, error, Message-ID, provider Message-ID",
            params=(outbound_id,),
            errors=(404,),
        ),
    )

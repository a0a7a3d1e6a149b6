"""Request bodies (pydantic, untrusted input) and the JSON form of answers for the HTTP API.

Edge module: validation and conversion only. Bodies forbid unknown keys
and are frozen (STYLE.md §5); a bad body is a pydantic ``ValidationError``,
answered 422 by ``errors.py``. Answers are plain JSON values built by
``jsonable`` from the frozen views of the services.
"""

from __future__ import annotations

import dataclasses
import enum
import json
from collections.abc import Mapping
from datetime import date, datetime
from typing import Annotated, Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, StringConstraints
from starlette.requests import Request

from gateway.http.errors import ApiError

JSON_TYPE = "application/json"
UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"

Name = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200)]
Email = Annotated[str, StringConstraints(strip_whitespace=True, min_length=3, max_length=320)]
SubaccountRef = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)] | int


class Body(BaseModel):
    """Base of request bodies: unknown keys are errors, values frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class SubaccountCreate(Body):
    """``POST /api/v1/subaccounts``."""

    name: Name


class UserCreate(Body):
    """``POST /api/v1/users``: an existing address gains the missing memberships."""

    email: Email
    name: Name
    subaccounts: tuple[SubaccountRef, ...] = Field(min_length=1)


class UserUpdate(Body):
    """``PATCH /api/v1/users/{id}``."""

    name: Name


class ContactCreate(Body):
    """``POST /api/v1/contacts`` (R10: one contact per address in a sub-account)."""

    subaccount: SubaccountRef
    email: Email
    name: Name | None = None
    assigned_user_email: Email | None = None


class ContactUpdate(Body):
    """``PATCH /api/v1/contacts/{id}``: ``name`` null clears it."""

    name: Name | None


BODY_MODELS: tuple[type[Body], ...] = (
    SubaccountCreate,
    UserCreate,
    UserUpdate,
    ContactCreate,
    ContactUpdate,
)
"""Every request body, for the OpenAPI document's ``components.schemas``."""

B = TypeVar("B", bound=Body)


async def parse_body(request: Request, model: type[B]) -> B:
    """Validate the JSON request body against ``model``.

    Raises:
        ApiError: 415 when the Content-Type is set and is not JSON; 400
            ``malformed_json`` when the body is not JSON at all.
        pydantic.ValidationError: well-formed JSON with invalid fields (→ 422).
    """
    content_type = request.headers.get("content-type", JSON_TYPE).split(";")[0].strip().lower()
    if content_type != JSON_TYPE and not content_type.endswith("+json"):
        raise ApiError(415, UNSUPPORTED_MEDIA_TYPE, f"send {JSON_TYPE}, not {content_type}")
    body = await request.body() or b"null"
    try:
        json.loads(body)
    except ValueError as exc:  # INTERFACE.md: 400 for bad input, 422 for validation
        raise ApiError(400, "malformed_json", f"the body is not JSON: {exc}") from exc
    return model.model_validate_json(body)


def jsonable(value: Any) -> Any:
    """Convert frozen dataclasses, enums, datetimes, tuples and mappings into JSON values.

    Bytes (ciphertexts) become None: secrets never reach an answer.
    """
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            f.name.removesuffix("_"): jsonable(getattr(value, f.name))
            for f in dataclasses.fields(value)
        }
    if isinstance(value, enum.Enum):
        return jsonable(value.value)
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | frozenset | set):
        return [jsonable(v) for v in value]
    if isinstance(value, bytes):
        return None
    return value


def json_schema(model: type[BaseModel]) -> dict[str, Any]:
    """Return the model's JSON Schema with ``$ref`` pointing into OpenAPI components."""
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    return dict(json.loads(json.dumps(schema)))

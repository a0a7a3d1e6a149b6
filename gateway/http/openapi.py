"""The OpenAPI 3.1 document served at ``/openapi.json``, built from the endpoint registry.

Pure: turns ``Endpoint`` values and the pydantic body models into a JSON
value; no I/O. Follows the OpenAPI Specification 3.1.0 (paths, parameters,
requestBody, responses, components.schemas, securitySchemes bearer).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from gateway.http.context import Endpoint, Param
from gateway.http.schemas import BODY_MODELS, json_schema

OPENAPI_VERSION = "3.1.0"
ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message", "details"],
            "properties": {
                "code": {"type": "string"},
                "message": {"type": "string"},
                "details": {"type": "object"},
            },
        }
    },
}
STATUS_TEXT = {
    200: "OK",
    201: "Created",
    202: "Accepted",
    303: "See Other",
    400: "Bad request",
    401: "Missing or unknown API key",
    403: "Sub-account outside the key's scope",
    404: "Not found",
    409: "Conflict",
    413: "Too large",
    415: "Unsupported media type",
    422: "Validation failed",
    429: "Quota exhausted; Retry-After says when it resets",
    502: "The provider answered an error",
    503: "Mailbox not connected, or provider unavailable",
}


def _parameter(param: Param) -> dict[str, Any]:
    out: dict[str, Any] = {
        "name": param.name,
        "in": param.where,
        "required": param.required or param.where == "path",
        "schema": param.schema,
    }
    if param.description:
        out["description"] = param.description
    return out


def _error_ref(status: int) -> dict[str, Any]:
    return {
        "description": STATUS_TEXT.get(status, "Error"),
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }


def _operation(endpoint: Endpoint) -> dict[str, Any]:
    op: dict[str, Any] = {
        "summary": endpoint.summary,
        "operationId": endpoint.handler.__name__ + "_" + endpoint.method.lower(),
        "parameters": [_parameter(p) for p in endpoint.params],
        "responses": {str(endpoint.status): {"description": STATUS_TEXT[endpoint.status]}},
    }
    if endpoint.body is not None:
        ref = {"$ref": f"#/components/schemas/{endpoint.body.__name__}"}
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": ref}}}
    errors = set(endpoint.errors)
    if endpoint.authenticated:
        errors |= {401, 403}
    else:
        op["security"] = []
    for status in sorted(errors):
        op["responses"][str(status)] = _error_ref(status)
    return op


def _components(endpoints: Iterable[Endpoint]) -> dict[str, Any]:
    schemas: dict[str, Any] = {"Error": ERROR_SCHEMA}
    bodies = dict.fromkeys((*BODY_MODELS, *(e.body for e in endpoints if e.body is not None)))
    for model in bodies:
        schema = json_schema(model)
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
    return {
        "schemas": schemas,
        "securitySchemes": {"apiKey": {"type": "http", "scheme": "bearer"}},
    }


def openapi_document(endpoints: Iterable[Endpoint], *, version: str) -> dict[str, Any]:
    """Return the OpenAPI document of ``endpoints`` (API version ``version``).

    Every authenticated operation requires the ``apiKey`` bearer scheme;
    every error response refers to the ``Error`` schema.
    """
    endpoints = tuple(endpoints)
    paths: dict[str, dict[str, Any]] = {}
    for endpoint in endpoints:
        paths.setdefault(endpoint.path, {})[endpoint.method.lower()] = _operation(endpoint)
    return {
        "openapi": OPENAPI_VERSION,
        "info": {"title": "mailgate", "version": version},
        "paths": paths,
        "components": _components(endpoints),
        "security": [{"apiKey": []}],
    }

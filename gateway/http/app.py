"""The ASGI app: health, readiness, metrics, the JSON API, the OAuth callback and the settings page.

``GET /healthz`` answers while the process runs; ``GET /readyz`` checks the
database and the listeners; ``GET /metrics`` is the Prometheus text format;
``/openapi.json`` documents the API. With an ``HttpContext`` the API
(``api.py``, ``api_mailbox.py``, and ``api_messages.py`` when it holds an
``OutboundService``) and the pages (``pages.py``) are mounted.
Errors use the INTERFACE.md body (``errors.py``). No business logic here:
routes call the services passed in by ``gateway/app.py``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from importlib.metadata import PackageNotFoundError, version

from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.sessions import SessionMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from gateway.http.api import directory_endpoints
from gateway.http.api_mailbox import mailbox_endpoints
from gateway.http.api_messages import message_endpoints
from gateway.http.context import Endpoint, HttpContext, Param
from gateway.http.errors import EXCEPTION_HANDLERS, error_response
from gateway.http.openapi import openapi_document
from gateway.http.pages import page_routes
from gateway.mailboxes import CALLBACK_PATH
from gateway.observability import Metrics

ReadyCheck = Callable[[], Awaitable[tuple[bool, str]]]
SESSION_COOKIE = "mailgate_session"


def _version() -> str:
    try:
        return version("mailgate")
    except PackageNotFoundError:
        return "0"


def _probe_endpoints(metrics: Metrics, ready_check: ReadyCheck) -> tuple[Endpoint, ...]:
    async def healthz(_: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(_: Request) -> Response:
        ready, reason = await ready_check()
        if ready:
            return JSONResponse({"status": "ready"})
        return error_response(503, "not_ready", reason)

    async def metrics_page(_: Request) -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return (
        Endpoint(
            path="/healthz", method="GET", handler=healthz, summary="Liveness", authenticated=False
        ),
        Endpoint(
            path="/readyz",
            method="GET",
            handler=readyz,
            summary="Readiness: database reachable, listeners up",
            authenticated=False,
            errors=(503,),
        ),
        Endpoint(
            path="/metrics",
            method="GET",
            handler=metrics_page,
            summary="Prometheus metrics (text format)",
            authenticated=False,
        ),
    )


def _callback_doc(handler: Callable[[Request], Awaitable[Response]]) -> Endpoint:
    """The OAuth callback as documented (served by ``pages.py``)."""
    return Endpoint(
        path=CALLBACK_PATH,
        method="GET",
        handler=handler,
        summary="OAuth redirect target (RFC 6749 §4.1.2): JSON with Accept: application/json, "
        "else a redirect to /settings/email",
        status=303,
        params=(
            Param(name="state", required=True),
            Param(name="code"),
            Param(name="error"),
        ),
        authenticated=False,
        errors=(400, 502, 503),
    )


def build_http_app(
    *, metrics: Metrics, ready_check: ReadyCheck, context: HttpContext | None = None
) -> Starlette:
    """Return the Starlette app.

    Args:
        metrics: rendered at ``/metrics``.
        ready_check: returns ``(ready, reason)``; ``reason`` is a short fixed
            phrase (never exception text) shown when not ready.
        context: the services; None serves only the probes and ``/openapi.json``.
    """
    endpoints = list(_probe_endpoints(metrics, ready_check))
    routes: list[BaseRoute] = []
    middleware: list[Middleware] = []
    if context is not None:
        endpoints += [
            *directory_endpoints(context),
            *mailbox_endpoints(context),
            *message_endpoints(context),
        ]
        secret = context.settings.http.session_secret
        enabled = secret is not None and bool(secret.get_secret_value())
        pages = page_routes(context, enabled=enabled)
        routes += pages
        endpoints.append(_callback_doc(next(r for r in pages if r.path == CALLBACK_PATH).endpoint))
        if secret is not None and enabled:
            middleware.append(
                Middleware(
                    SessionMiddleware,
                    secret_key=secret.get_secret_value(),
                    session_cookie=SESSION_COOKIE,
                    max_age=context.settings.http.session_max_age_seconds,
                    same_site="lax",  # the provider's redirect back is a top-level GET
                    https_only=context.settings.http.public_url.startswith("https://"),
                )
            )
    document = openapi_document(endpoints, version=_version())

    async def openapi(_: Request) -> Response:
        return JSONResponse(document)

    routes += [
        Route(e.path, e.handler, methods=[e.method]) for e in endpoints if e.path != CALLBACK_PATH
    ]
    routes.append(Route("/openapi.json", openapi, methods=["GET"]))
    return Starlette(
        routes=routes,
        middleware=middleware,
        exception_handlers=dict(EXCEPTION_HANDLERS),
    )

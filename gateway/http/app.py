"""The ASGI app: health, readiness and Prometheus metrics (the API comes later).

``GET /healthz`` answers while the process runs; ``GET /readyz`` checks the
database and the listeners; ``GET /metrics`` is the Prometheus text format.
Errors use the INTERFACE.md shape ``{"error": {"code", "message"}}``.
No business logic here: the checks are callables passed in by ``app.py``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.observability import Metrics

ReadyCheck = Callable[[], Awaitable[tuple[bool, str]]]


def build_http_app(*, metrics: Metrics, ready_check: ReadyCheck) -> Starlette:
    """Return the Starlette app.

    Args:
        metrics: rendered at ``/metrics``.
        ready_check: returns ``(ready, reason)``; ``reason`` is a short fixed
            phrase (never exception text) shown when not ready.
    """

    async def healthz(_: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(_: Request) -> Response:
        ready, reason = await ready_check()
        if ready:
            return JSONResponse({"status": "ready"})
        return JSONResponse({"error": {"code": "not_ready", "message": reason}}, status_code=503)

    async def metrics_page(_: Request) -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return Starlette(
        routes=[
            Route("/healthz", healthz),
            Route("/readyz", readyz),
            Route("/metrics", metrics_page),
        ]
    )

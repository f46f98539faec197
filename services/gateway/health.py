"""Liveness, readiness and metrics: `/healthz` (the process runs), `/readyz` (NATS and
Postgres both answer), `/metrics` (Prometheus text)."""

from __future__ import annotations

import asyncio
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, Counter, generate_latest
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.gateway.context import GatewayContext
from services.gateway.responses import FastJSONResponse

HTTP_REQUESTS = Counter(
    "xoogify_http_requests_total", "HTTP requests answered by the gateway", ["route", "status"]
)


class RequestMetrics:
    """Count HTTP requests by route (the endpoint's name, never the raw path, so the label
    set stays small) and status."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        # The labelled counters by (route, status): `labels()` validates and locks each time.
        self._counters: dict[tuple[str, int], Any] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def send_counted(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_counted)
        finally:
            endpoint = scope.get("endpoint")
            route = getattr(endpoint, "__name__", None) or "unmatched"
            counter = self._counters.get((route, status))
            if counter is None:
                counter = self._counters[route, status] = HTTP_REQUESTS.labels(route, str(status))
            counter.inc()


async def healthz(request: Request) -> Response:
    return FastJSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    ctx: GatewayContext | None = getattr(request.app.state, "ctx", None)
    # While starting, the NATS client exists before the context does.
    nc = ctx.nc if ctx is not None else getattr(request.app.state, "nc", None)
    nats_up = bool(nc is not None and nc.is_connected)
    postgres_up = False
    if ctx is not None:
        try:
            async with asyncio.timeout(1.0):
                postgres_up = await ctx.pool.fetchval("SELECT 1") == 1
        except Exception:
            postgres_up = False
    body: dict[str, object] = {
        "nats": "up" if nats_up else "down",
        "postgres": "up" if postgres_up else "down",
    }
    if nats_up and postgres_up:
        return FastJSONResponse({"status": "ready", **body})
    down = [name for name, up in (("nats", nats_up), ("postgres", postgres_up)) if not up]
    body["error"] = {"code": "unavailable", "message": f"down: {', '.join(down)}"}
    return FastJSONResponse(body, status_code=503)


async def metrics(request: Request) -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


routes = [
    Route("/healthz", healthz),
    Route("/readyz", readyz),
    Route("/metrics", metrics),
]

"""The gateway: one Starlette app serving the API, the pages, `/ws` and the Terraform state
backend, and ingesting JetStream into Postgres in the background.

`create_app` builds it (the lifespan connects NATS and Postgres, migrates, starts ingestion
and the websocket hub); `serve` runs it under uvicorn until SIGTERM/SIGINT.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import asyncpg
import uvicorn
from starlette.applications import Starlette
from starlette.routing import Mount, WebSocketRoute
from starlette.staticfiles import StaticFiles

from services.common import bus
from services.common.config import WEB_DIR, Settings
from services.gateway import api, db, health, migrate, openapi, pages, state_backend, webhooks, ws
from services.gateway.context import GatewayContext
from services.gateway.errors import handlers
from services.gateway.hub import Hub
from services.gateway.ingest import Ingestor
from services.gateway.webhook_delivery import WebhookConfig, WebhookWorker

log = logging.getLogger(__name__)

SHUTDOWN_DEADLINE_S = 10


async def _connect_postgres(settings: Settings) -> asyncpg.Pool:
    """Wait for Postgres (it may start after us), then migrate and open the pool."""
    delay = 0.2
    while True:
        try:
            await migrate.migrate(settings.database_url)
            return await db.create_pool(settings.database_url, min_size=2, max_size=20)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            log.warning("waiting for postgres", extra={"error": repr(exc)})
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)


def create_app(settings: Settings, gateway_id: str = "gw") -> Starlette:
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        nc = await bus.connect(settings, f"gateway-{gateway_id}")
        js = nc.jetstream()
        await bus.ensure_streams(js, settings)
        pool = await _connect_postgres(settings)
        ctx = GatewayContext(settings, gateway_id, pool, nc, js)
        app.state.ctx = ctx
        ingestors = [Ingestor(ctx, "events"), Ingestor(ctx, "logs")]
        tasks = [asyncio.create_task(i.run(), name=f"ingest-{i.kind}") for i in ingestors]
        ctx.hub = Hub(ctx)
        await ctx.hub.start()
        webhook_worker = WebhookWorker(pool, WebhookConfig.from_env())
        webhook_worker.start()
        log.info("gateway started", extra={"gateway_id": gateway_id})
        try:
            yield
        finally:
            await webhook_worker.stop()
            await ctx.hub.stop()
            for ingestor in ingestors:
                ingestor.stop()
            # Let a batch in hand finish its transaction and acks, then stop.
            _, pending = await asyncio.wait(tasks, timeout=5)
            for task in pending:
                task.cancel()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(nc.drain(), 5)
            await pool.close()
            log.info("gateway stopped")

    routes = [
        *health.routes,
        *api.routes,
        *webhooks.routes,
        *openapi.routes,
        *state_backend.routes,
        WebSocketRoute("/ws", ws.websocket_endpoint),
        Mount("/static", StaticFiles(directory=WEB_DIR / "static"), name="static"),
        *pages.routes,
    ]
    return Starlette(routes=routes, lifespan=lifespan, exception_handlers=handlers)


async def serve(settings: Settings, host: str, port: int, gateway_id: str = "gw") -> None:
    config = uvicorn.Config(
        create_app(settings, gateway_id),
        host=host,
        port=port,
        log_config=None,
        access_log=False,  # access lines would carry query strings (tokens, later)
        ws_max_size=64 * 1024,
        timeout_graceful_shutdown=SHUTDOWN_DEADLINE_S,
        lifespan="on",
    )
    server = uvicorn.Server(config)
    await server.serve()

"""The gateway: one Starlette app serving the API, the pages, `/ws` and the Terraform state
backend, and ingesting JetStream into Postgres in the background.

`create_app` builds it; `serve` runs it under uvicorn until SIGTERM/SIGINT. The app
answers at once, even while NATS or Postgres are still down: `/healthz` says it runs,
`/readyz` says what it waits for, and everything else answers 503 until the lifespan's
start-up task (connect, migrate, start ingestion and the hub) has finished.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import uvicorn
from nats.aio.client import Client
from nats.js import JetStreamContext
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.routing import Mount, WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send

from services.common import bus
from services.common.config import WEB_DIR, Settings
from services.common.jspub import JsPublisher
from services.gateway import (
    api,
    db,
    health,
    migrate,
    openapi,
    pages,
    runners,
    state_at_rest,
    state_backend,
    store_reset,
    webhooks,
    ws,
)
from services.gateway.auth import Authenticate
from services.gateway.context import GatewayContext
from services.gateway.errors import error_response, handlers
from services.gateway.hub import Hub
from services.gateway.ingest import Ingestor
from services.gateway.sealing import GatewayKeys
from services.gateway.webhook_delivery import WebhookConfig, WebhookWorker

log = logging.getLogger(__name__)

SHUTDOWN_DEADLINE_S = 10
# How long start-up may hold the server back, and a request wait for it, before the
# gateway serves anyway (503 until ready): long enough for the usual case, short enough
# that /healthz answers soon while NATS or Postgres are down.
START_WAIT_S = 2.0
_ALWAYS_OPEN = ("/healthz", "/readyz", "/metrics", "/static/")
MAX_WS_MESSAGE = 64 * 1024


async def _connect_nats(settings: Settings, gateway_id: str) -> Client:
    """Wait for NATS (it may start after us); afterwards the client reconnects by itself."""
    nc = await bus.until_done("connect", lambda: bus.connect(settings, f"gateway-{gateway_id}"))
    await bus.until_done("streams", lambda: bus.ensure_streams(nc.jetstream(), settings))
    return nc


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


class Running:
    """What the start-up task built, for the shutdown to take apart in reverse."""

    def __init__(self) -> None:
        self.nc: Client | None = None
        self.pool: asyncpg.Pool | None = None
        self.ctx: GatewayContext | None = None
        self.ingestors: list[Ingestor] = []
        self.tasks: list[asyncio.Task[None]] = []
        self.watch: asyncio.Task[None] | None = None
        self.webhooks: WebhookWorker | None = None
        self.store_watch: asyncio.Task[None] | None = None

    async def start(
        self, app: Starlette, settings: Settings, gateway_id: str, keys: GatewayKeys
    ) -> None:
        self.nc = await _connect_nats(settings, gateway_id)
        app.state.nc = self.nc  # /readyz reports NATS while Postgres is still awaited
        self.pool = await _connect_postgres(settings)
        pub = JsPublisher(self.nc)
        await pub.start()
        js = self.nc.jetstream()
        # Before anything is ingested or submitted: numbering must go on past what
        # Postgres holds, should NATS have lost its store.
        pool = self.pool
        await bus.until_done("store check", lambda: store_reset.repair(pool, js, settings))
        ctx = GatewayContext(settings, gateway_id, self.pool, self.nc, js, keys, pub)
        self.ingestors = [Ingestor(ctx, "events"), Ingestor(ctx, "logs")]
        self.tasks = [asyncio.create_task(i.run(), name=f"ingest-{i.kind}") for i in self.ingestors]
        self.tasks.append(
            asyncio.create_task(
                state_at_rest.reencrypt_in_background(self.pool, keys.state), name="state-keys"
            )
        )
        # Runs until cancelled (stop() does that first: it has nothing in hand to finish).
        self.watch = asyncio.create_task(runners.forget_stopped(ctx), name="runners")
        ctx.hub = Hub(ctx)
        await bus.until_done("live events", ctx.hub.start)
        self.webhooks = WebhookWorker(self.pool, WebhookConfig.from_env(), keys.state)
        self.webhooks.start()
        self.ctx = ctx
        app.state.ctx = ctx  # from here on requests are served
        app.state.started.set()
        self.store_watch = asyncio.create_task(_watch_store(app, js, settings), name="store")
        log.info("gateway started", extra={"gateway_id": gateway_id})

    async def stop(self) -> None:
        if self.store_watch is not None:
            self.store_watch.cancel()
        if self.watch is not None:
            self.watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.watch
        if self.webhooks is not None:
            await self.webhooks.stop()
        if self.ctx is not None and self.ctx.hub is not None:
            await self.ctx.hub.stop()
        for ingestor in self.ingestors:
            ingestor.stop()
        if self.tasks:
            # Let a batch in hand finish its transaction and acks, then stop.
            _, pending = await asyncio.wait(self.tasks, timeout=5)
            for task in pending:
                task.cancel()
            if pending:
                # Their ends give back the connections they hold, which the pool's close awaits.
                await asyncio.wait(pending, timeout=5)
        if self.ctx is not None:
            await self.ctx.pub.close()
        if self.nc is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.nc.drain(), 5)
        if self.pool is not None:
            try:
                # It waits for every connection taken from it: bounded, so that a holder
                # that never gives one back cannot keep the gateway from stopping.
                await asyncio.wait_for(self.pool.close(), 5)
            except TimeoutError:
                log.warning("postgres pool not closed in time; connections terminated")
                self.pool.terminate()
        log.info("gateway stopped")


async def _watch_store(app: Starlette, js: JetStreamContext, settings: Settings) -> None:
    """Stop serving, exit code STORE_LOST_EXIT, once a stream numbered by Postgres is gone
    (NATS lost its store under this gateway): started again, the gateway checks the new
    streams against Postgres before it takes a submission. Until then nobody makes them
    (bus.ensure_streams), so no submission gets an old job's build ID meanwhile."""
    await bus.until_store_lost(js, settings.subjects.numbered_by_postgres)
    app.state.exit_code = bus.STORE_LOST_EXIT
    app.state.stop_serving()


def _log_start_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("gateway start-up failed", exc_info=task.exception())


class WaitForStart:
    """Until the start-up task is done, answer 503 (HTTP, JSON) or close 1013 (websocket,
    "try again later") instead of failing on a context that does not exist yet."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or scope["path"].startswith(_ALWAYS_OPEN):
            await self.app(scope, receive, send)
            return
        state = scope["app"].state
        if not state.started.is_set():
            # Only while starting: wait_for costs a task and a timer, once per request.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(state.started.wait(), START_WAIT_S)
        if getattr(state, "ctx", None) is not None:
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1013, "reason": "starting"})
            return
        response = error_response(503, "the gateway is starting: waiting for NATS and Postgres")
        await response(scope, receive, send)


def create_app(settings: Settings, gateway_id: str = "gw") -> Starlette:
    # Checked before anything starts: a gateway without its keys refuses to run (SecretsError
    # names the missing setting).
    keys = GatewayKeys.from_settings(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        running = Running()
        app.state.started = asyncio.Event()
        starting = asyncio.create_task(running.start(app, settings, gateway_id, keys))
        # Start-up waits out NATS and Postgres (bus.until_done, _connect_postgres); anything
        # else that ends it after START_WAIT_S would leave a gateway answering 503 unsaid.
        starting.add_done_callback(_log_start_failure)
        await asyncio.wait([starting], timeout=START_WAIT_S)
        if starting.done() and starting.exception() is not None:
            raise RuntimeError("gateway start-up failed") from starting.exception()
        try:
            yield
        finally:
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await starting
            await running.stop()

    routes = [
        # The API first: a route is found by trying each in turn, and it is the busiest.
        # No two of these lists share a path.
        *api.routes,
        *health.routes,
        *webhooks.routes,
        *openapi.routes,
        *state_backend.routes,
        WebSocketRoute("/ws", ws.websocket_endpoint),
        Mount("/static", StaticFiles(directory=WEB_DIR / "static"), name="static"),
        *pages.routes,
    ]
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers=handlers,
        middleware=[
            Middleware(health.RequestMetrics),
            Middleware(WaitForStart),
            # After start-up: it needs the Postgres pool to check tokens.
            Middleware(Authenticate),
        ],
    )
    app.state.exit_code = 0
    # `serve` replaces it with its server's stop; an app served otherwise (the tests'
    # in-process gateway) only logs the lost store.
    app.state.stop_serving = lambda: None
    return app


def server_config(app: ASGIApp, host: str, port: int, **overrides: Any) -> uvicorn.Config:
    """How the gateway is served: also used by the tests' in-process gateway, so the
    websocket limits they check are the production ones."""
    options: dict[str, Any] = {
        "host": host,
        "port": port,
        "log_config": None,
        # Access lines would carry query strings, and a login URL carries a token.
        "access_log": False,
        # A client message over 64 KiB closes the socket with 1009 (message too big).
        "ws_max_size": MAX_WS_MESSAGE,
        # Compression cost 40 % of the gateway's CPU in the fan-out benchmark (once per
        # socket, for small JSON frames on loopback or a LAN): off.
        "ws_per_message_deflate": False,
        "timeout_graceful_shutdown": SHUTDOWN_DEADLINE_S,
        "lifespan": "on",
    }
    options.update(overrides)
    return uvicorn.Config(app, **options)


async def serve(settings: Settings, host: str, port: int, gateway_id: str = "gw") -> int:
    """Serve until SIGTERM/SIGINT (exit code 0) or a lost NATS store (STORE_LOST_EXIT)."""
    app = create_app(settings, gateway_id)
    server = uvicorn.Server(server_config(app, host, port))
    app.state.stop_serving = functools.partial(setattr, server, "should_exit", True)
    await server.serve()
    return int(app.state.exit_code)

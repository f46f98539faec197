"""What every part of the gateway shares: settings, the Postgres pool, the NATS connection
(and its JetStream publisher) and the websocket hub. Built once in the app's lifespan, kept
on `app.state.ctx`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import asyncpg
from nats.aio.client import Client
from nats.js import JetStreamContext
from starlette.requests import HTTPConnection

from services.common.config import Settings
from services.common.jspub import JsPublisher

if TYPE_CHECKING:
    from services.gateway.hub import Hub
    from services.gateway.sealing import GatewayKeys


@dataclass
class GatewayContext:
    settings: Settings
    gateway_id: str
    pool: asyncpg.Pool[Any]
    nc: Client
    js: JetStreamContext
    keys: GatewayKeys
    pub: JsPublisher
    hub: Hub | None = None


def context_of(conn: HTTPConnection) -> GatewayContext:
    """The gateway's context for a request or websocket of this app."""
    ctx: GatewayContext = conn.app.state.ctx
    return ctx

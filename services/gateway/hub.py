"""Websocket fan-out hub (placeholder: the live part of the gateway replaces it)."""

from __future__ import annotations

from services.gateway.context import GatewayContext


class Hub:
    """Follows the events stream once and fans updates out to every websocket."""

    def __init__(self, ctx: GatewayContext) -> None:
        self.ctx = ctx
        self.last_seq = 0

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

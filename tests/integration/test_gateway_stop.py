"""The gateway stops within its deadline even when a Postgres connection is never given
back: the pool's close, which waits for every connection, is bounded."""

from __future__ import annotations

import time

import asyncpg
import pytest

from services.common.config import Settings
from tests.integration.ws_support import serve_gateway


async def test_a_connection_never_given_back_does_not_hold_the_stop(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    async with serve_gateway(settings) as gw:
        held = await gw.app.state.ctx.pool.acquire()
        stopping = time.monotonic()
    # serve_gateway waited for the server to end (it fails after 30 s).
    assert time.monotonic() - stopping < 25
    assert "postgres pool not closed in time" in caplog.text
    # Terminated: the holder's handle no longer works.
    with pytest.raises(asyncpg.InterfaceError):
        await held.fetchval("SELECT 1")

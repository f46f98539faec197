"""The gateway started before NATS: it answers /healthz at once, /readyz and the API with
503 JSON until NATS is there, and then becomes ready by itself."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlparse

import httpx
import uvicorn

from services.common.config import Settings
from services.common.embedded import EmbeddedNats, free_port
from services.gateway.app import create_app
from tests.support import auth_headers, eventually


@contextlib.asynccontextmanager
async def listening(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """The app under uvicorn, as soon as it listens (ready or not)."""
    port = int(urlparse(settings.gateway_url).port or 80)
    config = uvicorn.Config(
        create_app(settings), host="127.0.0.1", port=port, log_level="warning", lifespan="on"
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    try:

        async def started() -> bool:
            if task.done():
                task.result()
            return server.started

        await eventually(started, timeout=15, interval=0.02)
        async with httpx.AsyncClient(
            base_url=settings.gateway_url, headers=auth_headers(settings)
        ) as client:
            yield client
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 30)


async def test_starts_without_nats_and_becomes_ready(settings: Settings, tmp_path: Path) -> None:
    port = free_port()
    late = dataclasses.replace(settings, nats_url=f"nats://127.0.0.1:{port}")
    nats = EmbeddedNats(tmp_path / "late-nats", port=port, log_file=tmp_path / "late.log")
    async with listening(late) as client:
        assert (await client.get("/healthz")).status_code == 200
        ready = await client.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["nats"] == "down" and ready.json()["error"]["code"]
        jobs = await client.get("/api/jobs")
        assert jobs.status_code == 503 and jobs.json()["error"]["code"] == "unavailable"
        nats.start()
        try:

            async def is_ready() -> bool:
                return (await client.get("/readyz")).status_code == 200

            await eventually(is_ready, timeout=20)
            listing = await client.get("/api/jobs")
            assert listing.status_code == 200 and listing.json()["items"] == []
        finally:
            nats.stop()

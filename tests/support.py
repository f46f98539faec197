"""Helpers for integration tests: a websocket recorder to wait on, and waiting with a
deadline for a condition (never a bare sleep as synchronisation)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import asyncpg
import nats
from websockets.asyncio.client import ClientConnection, connect

from services.common import bus, codec
from services.common.config import Settings
from services.gateway import migrate, token_store

T = TypeVar("T")


async def eventually(
    probe: Callable[[], Awaitable[T | None]], timeout: float = 30.0, interval: float = 0.05
) -> T:
    """Call `probe` until it returns something truthy; fail after `timeout` seconds."""
    async with asyncio.timeout(timeout):
        while True:
            value = await probe()
            if value:
                return value
            await asyncio.sleep(interval)


async def gateway_streams(settings: Settings) -> None:
    """Make the streams as a gateway does at start-up: a scheduler or runner started
    without one waits for them (bus.ensure_streams)."""
    nc = await nats.connect(settings.nats_servers)
    try:
        await bus.ensure_streams(nc.jetstream(), settings)
    finally:
        await nc.close()


async def admin_token(database_url: str, name: str = "test-admin") -> str:
    """Migrate a test's database and make an admin token the gateway accepts."""
    return await make_token(database_url, name, "admin")


async def make_token(
    database_url: str, name: str, kind: str, organizations: list[str] | None = None
) -> str:
    """A new API token of that kind, straight in the (migrated) database."""
    conn = await asyncpg.connect(database_url)
    try:
        await migrate.apply(conn)
        _, secret = await token_store.create(conn, name, kind, organizations or [])
    finally:
        await conn.close()
    return secret


async def stored_as_if_ingested(
    database_url: str, build_id: int, status: str, seq: int, watermarks: dict[str, int]
) -> None:
    """A job row and ingestion watermarks (`kind` → watermark) as a gateway would have
    stored them, in a migrated database, with nothing behind them in NATS: what a lost
    NATS store leaves."""
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(
            "INSERT INTO jobs (build_id, organization, environment, module_type, module_name,"
            " action, status, seq, submitted_at, updated_at, stream_seq)"
            " VALUES ($1, 'acme', 'stg', 'amd64/script', 'hello', 'PLAN', $2, $3, now(),"
            " now(), $4)",
            build_id,
            status,
            seq,
            watermarks.get("events", 0),
        )
        await conn.executemany(
            "INSERT INTO ingest_progress (consumer, kind, watermark) VALUES ($1, $2, $3)",
            [(f"ingest-{kind}-gw", kind, mark) for kind, mark in watermarks.items()],
        )
    finally:
        await conn.close()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def auth_headers(settings: Settings) -> dict[str, str]:
    """What every HTTP or websocket client of a test sends to be let in: the test's admin
    token as a Bearer header (none while the settings carry no token)."""
    return {"Authorization": f"Bearer {settings.token}"} if settings.token else {}


class WsRecorder:
    """A `/ws` client that records every message, and lets a test wait for one."""

    def __init__(self, url: str, headers: dict[str, str] | None = None) -> None:
        self.url = url
        self.headers = headers or {}
        self.messages: list[dict[str, Any]] = []
        self._changed = asyncio.Condition()
        self._ws: ClientConnection | None = None
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> WsRecorder:
        self._ws = await connect(
            self.url, max_size=64 * 1024 * 1024, additional_headers=self.headers
        )
        self._task = asyncio.create_task(self._read())
        await self.wait_for(lambda m: m.get("type") == "hello")
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._ws is not None:
            await self._ws.close()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _read(self) -> None:
        assert self._ws is not None
        with contextlib.suppress(Exception):
            async for raw in self._ws:
                async with self._changed:
                    self.messages.append(codec.loads(raw))
                    self._changed.notify_all()

    async def send(self, message: dict[str, Any]) -> None:
        assert self._ws is not None
        await self._ws.send(codec.dumps_str(message))

    @property
    def hello(self) -> dict[str, Any]:
        return next(m for m in self.messages if m.get("type") == "hello")

    def job_items(self, build_id: int | None = None) -> list[dict[str, Any]]:
        items = [i for m in self.messages if m.get("type") == "jobs" for i in m["items"]]
        return [i for i in items if build_id is None or i["build_id"] == build_id]

    async def wait_for(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 30.0
    ) -> dict[str, Any]:
        async with asyncio.timeout(timeout), self._changed:
            while True:
                for message in self.messages:
                    if predicate(message):
                        return message
                await self._changed.wait()

    async def wait_for_seq(self, stream_seq: int, timeout: float = 30.0) -> dict[str, Any]:
        """Wait for the `jobs` frame that carries the event at `stream_seq`."""
        return await self.wait_for(
            lambda m: (
                m.get("type") == "jobs" and any(i["stream_seq"] == stream_seq for i in m["items"])
            ),
            timeout,
        )

    async def wait_job_status(
        self, build_id: int, statuses: set[str], timeout: float = 60.0
    ) -> dict[str, Any]:
        def has(message: dict[str, Any]) -> bool:
            return message.get("type") == "jobs" and any(
                i["build_id"] == build_id and i["status"] in statuses for i in message["items"]
            )

        await self.wait_for(has, timeout)
        return next(i for i in self.job_items(build_id) if i["status"] in statuses)


def parses_as_json(data: bytes) -> bool:
    """Whether `data` is JSON: how a test tells a Terraform state stored in clear from one
    encrypted at rest (a ciphertext starts with a random nonce, so 1 in 256 begins with
    `{`: a test looking at the first byte failed that often)."""
    try:
        codec.loads(data)
    except ValueError:
        return False
    return True

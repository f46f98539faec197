"""A `/ws` client that notes when each job's final status first arrives (wall clock and
perf counter), so a scenario can wait for a set of jobs and time them."""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from typing import Any

from websockets.asyncio.client import ClientConnection, connect

from services.common import codec

FINAL = ("SUCCESS", "FAILURE")


@dataclass
class Final:
    status: str
    received: float  # perf_counter
    received_wall: float  # time.time()
    item: dict[str, Any]


@dataclass
class FinalWatcher:
    url: str
    headers: dict[str, str] = field(default_factory=dict)
    finals: dict[int, Final] = field(default_factory=dict)
    _ws: ClientConnection | None = None
    _task: asyncio.Task[None] | None = None
    _changed: asyncio.Event = field(default_factory=asyncio.Event)
    resyncs: int = 0

    async def __aenter__(self) -> FinalWatcher:
        self._ws = await connect(
            self.url, max_size=64 * 1024 * 1024, additional_headers=self.headers
        )
        hello = codec.loads(await self._ws.recv())
        assert hello["type"] == "hello", hello
        self._task = asyncio.create_task(self._read())
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
        async for raw in self._ws:
            now, wall = time.perf_counter(), time.time()
            message = codec.loads(raw)
            if message.get("type") == "resync":
                self.resyncs += 1
            if message.get("type") != "jobs":
                continue
            for item in message["items"]:
                if item["status"] in FINAL and item["build_id"] not in self.finals:
                    self.finals[item["build_id"]] = Final(item["status"], now, wall, item)
            self._changed.set()

    async def wait_all(self, build_ids: set[int], timeout: float) -> set[int]:
        """Wait until every build in `build_ids` is final; return those still missing."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                while not build_ids <= self.finals.keys():
                    self._changed.clear()
                    await self._changed.wait()
        return build_ids - self.finals.keys()

"""A burst of jobs submitted over HTTP as a careful client would: many at once, each with
its own Idempotency-Key, retried (same key, same body) while the gateway is unreachable or
answers 5xx. A retried submission is the same job, so every key ends up with exactly one
build ID, and that is the set of jobs the fault test then checks for loss."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import httpx

from services.common.config import Settings
from tests.stack import Stack
from tests.support import auth_headers

CONCURRENCY = 16
RETRY_DELAY_S = 0.1


def trace_job(n: int) -> dict[str, Any]:
    return {
        "organization": "faults",
        "environment": f"env{n % 8}",
        "module_type": "amd64/script",
        "module_name": "trace",
        "action": "PLAN",
    }


async def start_services(stack: Stack, runners: int = 3) -> None:
    """The gateway, the scheduler and script runners, as every burst test runs them."""
    await stack.start_gateway()
    await stack.start_scheduler()
    for i in range(runners):
        await stack.start_runner(f"runner-{i + 1}", kinds="script")


async def count_final(database_url: str) -> int:
    """Jobs already final in Postgres (to tell how many were in flight when a fault hit)."""
    conn = await asyncpg.connect(database_url)
    try:
        return int(
            await conn.fetchval("SELECT count(*) FROM jobs WHERE status IN ('SUCCESS', 'FAILURE')")
        )
    finally:
        await conn.close()


@dataclass
class Burst:
    """Submits `size` jobs; `accepted` maps each job's number to its build ID (a 202)."""

    settings: Settings
    size: int
    accepted: dict[int, int] = field(default_factory=dict)
    retries: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    started: float = 0.0
    finished: float = 0.0

    @property
    def build_ids(self) -> set[int]:
        return set(self.accepted.values())

    async def start(self) -> asyncio.Task[None]:
        """Begin submitting; return once a third is accepted, the moment a fault hits."""
        task = asyncio.create_task(self.run())
        await self.wait_accepted(self.size // 3)
        return task

    async def run(self, deadline_s: float = 300.0) -> None:
        queue: asyncio.Queue[int] = asyncio.Queue()
        for n in range(self.size):
            queue.put_nowait(n)
        self.started = time.monotonic()
        limits = httpx.Limits(max_connections=CONCURRENCY)
        async with (
            httpx.AsyncClient(
                base_url=self.settings.gateway_url,
                headers=auth_headers(self.settings),
                timeout=10,
                limits=limits,
            ) as http,
            asyncio.timeout(deadline_s),
        ):

            async def worker() -> None:
                while not queue.empty():
                    n = queue.get_nowait()
                    self.accepted[n] = await self._submit(http, n)
                    self.changed.set()

            await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
        self.finished = time.monotonic()

    async def _submit(self, http: httpx.AsyncClient, n: int) -> int:
        headers = {"Idempotency-Key": f"burst-{n}"}
        while True:
            try:
                response = await http.post("/api/jobs", json=trace_job(n), headers=headers)
            except httpx.TransportError as exc:
                self._retry(type(exc).__name__)
            else:
                if response.status_code == 202:
                    return int(response.json()["build_id"])
                if response.status_code < 500:
                    raise AssertionError(f"job {n}: {response.status_code} {response.text}")
                self._retry(str(response.status_code))
            await asyncio.sleep(RETRY_DELAY_S)  # back off before the retry (not a sync)

    def _retry(self, why: str) -> None:
        self.retries += 1
        self.errors[why] = self.errors.get(why, 0) + 1

    async def wait_accepted(self, count: int, timeout: float = 120.0) -> None:
        """Until at least `count` jobs got their 202."""
        async with asyncio.timeout(timeout):
            while len(self.accepted) < count:
                self.changed.clear()
                await self.changed.wait()

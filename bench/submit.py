"""Submitting no-op jobs over HTTP, as a user would.

The load generator runs on the same two cores as the stack it measures, so its own CPU per
request is taken from the stack: aiohttp (C-accelerated HTTP parsing, keep-alive pool) costs
about a third of httpx's per request here, which is why the submitting benchmarks use it
(`python -m bench throughput` with httpx spent more CPU in the client than in the gateway).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from types import TracebackType

import aiohttp

from services.common import codec
from services.common.config import machine_arch


def noop_job(n: int) -> dict[str, str]:
    return {
        "organization": "bench",
        "environment": f"env{n % 8}",
        "module_type": f"{machine_arch()}/script",
        "module_name": "noop",
        "action": "PLAN",
    }


class Submitter:
    """`POST /api/jobs` over a pool of at most `connections` keep-alive connections."""

    def __init__(self, base_url: str, headers: Mapping[str, str], connections: int = 16) -> None:
        self.base_url = base_url.rstrip("/")
        self.headers = {**headers, "Content-Type": "application/json"}
        self.connections = connections
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Submitter:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=self.connections),
            timeout=aiohttp.ClientTimeout(total=60),
        )
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._session is not None:
            await self._session.close()

    async def submit(self, body: Mapping[str, object]) -> tuple[int, float, float]:
        """(build_id, when the request was sent, when the 202 came back) in perf_counter."""
        assert self._session is not None, "use Submitter as an async context manager"
        sent = time.perf_counter()
        async with self._session.post(
            f"{self.base_url}/api/jobs", data=codec.dumps(body), headers=self.headers
        ) as response:
            raw = await response.read()
        answered = time.perf_counter()
        if response.status != 202:
            raise RuntimeError(f"submit answered {response.status}: {raw[:200]!r}")
        return int(codec.loads(raw)["build_id"]), sent, answered

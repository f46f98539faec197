"""Helpers of the cluster tests: which scheduler leads (from its /metrics), submitting with
retries through a NATS failover, and reading the gateway's durable record."""

from __future__ import annotations

import re
import time
from typing import Any

import httpx

from tests.stack import Stack
from tests.support import eventually

LEADER_METRIC = re.compile(r"^xoogify_scheduler_leader (\S+)$", re.MULTILINE)


async def leads(metrics_port: int) -> bool | None:
    """True/False from the scheduler's gauge; None while it does not answer."""
    try:
        async with httpx.AsyncClient() as client:
            r = await client.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=1)
    except httpx.HTTPError:
        return None
    found = LEADER_METRIC.search(r.text)
    return None if found is None else float(found.group(1)) == 1.0


async def the_leader(stack: Stack, schedulers: dict[str, int], timeout: float = 30) -> str:
    """The name of the one scheduler whose gauge says it leads (exactly one must)."""

    async def probe() -> str | None:
        leading = [name for name, port in schedulers.items() if await leads(port)]
        if len(leading) > 1:
            raise AssertionError(f"two schedulers lead at once: {leading}")
        return leading[0] if leading else None

    return await eventually(probe, timeout=timeout, interval=0.1)


async def wait_takeover(name: str, port: int, timeout: float = 30) -> float:
    """Seconds until scheduler `name` says it leads."""
    started = time.monotonic()

    async def probe() -> bool:
        return bool(await leads(port))

    await eventually(probe, timeout=timeout, interval=0.05)
    return time.monotonic() - started


def job_body(environment: str, action: str, evidence: str, **variables: str) -> dict[str, Any]:
    return {
        "organization": "acme",
        "environment": environment,
        "module_type": "amd64/script",
        "module_name": "evidence",
        "action": action,
        "variables": {"evidence": evidence, **variables},
    }


async def submit_until_accepted(
    client: httpx.AsyncClient, body: dict[str, Any], key: str, timeout: float = 60
) -> int:
    """POST with an Idempotency-Key until a 202: a NATS node may be failing over, and the
    same key makes every retry the same job."""

    async def attempt() -> int | None:
        try:
            r = await client.post("/api/jobs", json=body, headers={"Idempotency-Key": key})
        except httpx.HTTPError:
            return None
        return int(r.json()["build_id"]) if r.status_code == 202 else None

    return await eventually(attempt, timeout=timeout, interval=0.2)

"""Submitting no-op jobs over HTTP, as a user would."""

from __future__ import annotations

import time
from collections.abc import Mapping

import httpx

from services.common.config import machine_arch


def noop_job(n: int) -> dict[str, str]:
    return {
        "organization": "bench",
        "environment": f"env{n % 8}",
        "module_type": f"{machine_arch()}/script",
        "module_name": "noop",
        "action": "PLAN",
    }


async def submit(http: httpx.AsyncClient, body: Mapping[str, object]) -> tuple[int, float, float]:
    """(build_id, when the request was sent, when the 202 came back) in perf_counter."""
    sent = time.perf_counter()
    response = await http.post("/api/jobs", json=body)
    answered = time.perf_counter()
    if response.status_code != 202:
        raise RuntimeError(f"submit answered {response.status_code}: {response.text[:200]}")
    return int(response.json()["build_id"]), sent, answered

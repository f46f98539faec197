"""Finding one job for a caller: from Postgres, waiting a little for one that was just
submitted and is not stored yet, and only if the caller may see its organization (a job
of another organization is answered as missing: its existence is not revealed)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from services.gateway import db
from services.gateway.context import GatewayContext

MAX_BUILD_ID = 2**63 - 1  # a Postgres bigint
INGEST_WAIT_S = 5.0


def _visible(job: dict[str, Any] | None, scope: Sequence[str] | None) -> dict[str, Any] | None:
    if job is None or scope is None or job["organization"] in scope:
        return job
    return None


async def get_job_soon(
    ctx: GatewayContext, build_id: int, scope: Sequence[str] | None = None
) -> dict[str, Any] | None:
    """The job from Postgres; for a job already submitted but not yet stored (the page of a
    job opened right after its submission), wait a little for ingestion to catch up.
    `scope`: the organizations the caller may see (None: every one)."""
    if build_id > MAX_BUILD_ID:
        return None
    job = await db.get_job(ctx.pool, build_id)
    if job is not None:
        return _visible(job, scope)
    try:
        info = await ctx.js.stream_info(ctx.settings.subjects.submit_stream)
    except Exception:
        return None
    # Build IDs are the submit stream's sequences: a higher one was never submitted.
    if build_id > info.state.last_seq:
        return None
    loop = asyncio.get_running_loop()
    deadline = loop.time() + INGEST_WAIT_S
    while loop.time() < deadline:
        await asyncio.sleep(0.1)
        job = await db.get_job(ctx.pool, build_id)
        if job is not None:
            return _visible(job, scope)
    return None

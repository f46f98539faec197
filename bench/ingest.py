"""`ingest`: status events published to JetStream (as the scheduler would) → stored in
Postgres by the gateway's ingestion. Events per second from the first publish until the
gateway's watermark covers the last one. Target ≥ 25,000/s."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import asyncpg

from bench.cpu import CpuShares
from bench.job_events import interleaved_lives, publish_all
from bench.report import Result
from bench.stack import BenchStack, Servers, running_stack
from services.common import bus
from services.common.jspub import JsPublisher

DEFAULT = 150_000
TINY = 300
TARGET = "≥ 25,000/s"


async def watermark(conn: asyncpg.Connection) -> int:
    value = await conn.fetchval(
        "SELECT coalesce(max(watermark), 0) FROM ingest_progress WHERE kind = 'events'"
    )
    return int(value)


async def wait_watermark(conn: asyncpg.Connection, last: int, timeout: float) -> float:
    """Poll (every 5 ms: a measurement, not a synchronisation) until the watermark reaches
    `last`; return the moment it was seen."""
    deadline = time.perf_counter() + timeout
    while await watermark(conn) < last:
        if time.perf_counter() > deadline:
            raise TimeoutError(f"watermark below {last} after {timeout}s")
        await asyncio.sleep(0.005)
    return time.perf_counter()


async def measure(bench: BenchStack, events: int) -> dict[str, Any]:
    """Publish `events` (a multiple of 3: whole job lives) and time their ingestion; also
    count what was stored. Shared with `ceiling`, which reports it beside the raw rates."""
    jobs = events // 3
    lives = list(interleaved_lives(jobs))
    nc = await bus.connect(bench.settings, "bench-ingest")
    conn = await asyncpg.connect(bench.settings.database_url)
    pub = JsPublisher(nc)
    try:
        await pub.start()
        cpu = await CpuShares.measuring(bench, conn)
        start = time.perf_counter()
        last = await publish_all(pub, bench.settings.subjects, lives)
        published = time.perf_counter()
        stored_at_publish = await watermark(conn)
        # Generous: a slow run is a figure, only a lost event is a failure.
        done = await wait_watermark(conn, last, timeout=max(120.0, events / 200))
        shares = cpu.us_per_event(len(lives))
        stored_events = await conn.fetchval("SELECT count(*) FROM job_events")
        stored_jobs = await conn.fetchval("SELECT count(*) FROM jobs")
        final_jobs = await conn.fetchval(
            "SELECT count(*) FROM jobs WHERE status = 'SUCCESS' AND seq = 3"
        )
    finally:
        await conn.close()
        await pub.close()
        await nc.drain()
    return {
        "events": len(lives),
        "events_per_s": len(lives) / (done - start),
        "publish_events_per_s": len(lives) / (published - start),
        "ingest_lag_after_publish_ms": (done - published) * 1000,
        # The backlog left when publishing ended, stored with the publisher quiet.
        "backlog_events_per_s": (last - stored_at_publish) / (done - published),
        # CPU per event of the gateway (ingestion and the hub), NATS, Postgres (every
        # process of the server) and this publisher: steadier than the rates on a shared
        # machine, and the sum is what two cores must hold at the target rate.
        **shares,
        "total_cpu_us_per_event": sum(shares.values()),
        "stored_events": int(stored_events),
        "stored_jobs": int(stored_jobs),
        "final_jobs": int(final_jobs),
        "missing": (len(lives) - int(stored_events)) + (jobs - int(final_jobs)),
    }


async def run(servers: Servers, size: int) -> Result:
    result = Result("ingest", size, targets={"events_per_s": TARGET})
    async with running_stack(servers) as bench:
        figures = await measure(bench, size - size % 3)
        result.figures.update(figures)
        if figures["missing"]:
            bench.keep = True
            result.problem(
                f"{figures['missing']} missing: {figures['stored_events']} events stored of "
                f"{figures['events']}, {figures['final_jobs']} jobs final of "
                f"{figures['events'] // 3}"
            )
    result.notes.append(
        "events_per_s counts from the first publish to the watermark covering the last "
        "event; the publisher (this process) shares the 2 cores with gateway, NATS, Postgres"
    )
    return result

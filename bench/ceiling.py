"""`ceiling`: what this machine does with no Xoogify code in the way — raw nats-py core
publish → subscribe, JetStream async publish with acks, asyncpg `copy_records_to_table`
and `executemany` — and the ingest scenario's rate beside them as a ratio."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import asyncpg
import nats

from bench import ingest
from bench.job_events import job_event
from bench.report import Result
from bench.stack import Servers, running_stack
from services.common import codec
from services.common.jspub import JsPublisher

DEFAULT = 150_000
TINY = 3_000
INGEST_MAX = 30_000  # the ingest run beside it: enough for a steady rate
AWAITED = 5_000  # publishes awaited one at a time, per client


async def core_pub_sub(url: str, count: int, payload: bytes) -> float:
    """msgs/s from the first publish until a subscriber (own connection) has them all."""
    sub_nc, pub_nc = await nats.connect(url), await nats.connect(url)
    got = 0
    done = asyncio.Event()

    async def on_msg(_msg: Any) -> None:
        nonlocal got
        got += 1
        if got == count:
            done.set()

    try:
        await sub_nc.subscribe("bench.ceiling", cb=on_msg, pending_msgs_limit=count + 1)
        await sub_nc.flush()
        start = time.perf_counter()
        for _ in range(count):
            await pub_nc.publish("bench.ceiling", payload)
        await pub_nc.flush()
        await asyncio.wait_for(done.wait(), 120)
        return count / (time.perf_counter() - start)
    finally:
        await pub_nc.close()
        await sub_nc.close()


async def js_publish(url: str, count: int, payload: bytes) -> dict[str, float]:
    """JetStream publish with acks through nats-py and through `JsPublisher`: the
    pipelined rate, and this process's CPU per publish (steadier than rates on a shared
    machine), pipelined and one awaited publish at a time (`AWAITED` of them)."""
    nc = await nats.connect(url)
    try:
        js = nc.jetstream(publish_async_max_pending=4000)
        await js.add_stream(name="BENCH_CEILING", subjects=["bench.js"])
        pub = JsPublisher(nc)
        await pub.start()

        async def nats_py_pipelined() -> None:
            futures = [await js.publish_async("bench.js", payload) for _ in range(count)]
            for future in futures:
                await future

        async def jspub_pipelined() -> None:
            futures = [await pub.send("bench.js", payload) for _ in range(count)]
            for future in futures:
                await future

        async def nats_py_awaited() -> None:
            for _ in range(AWAITED):
                await js.publish("bench.js", payload)

        async def jspub_awaited() -> None:
            for _ in range(AWAITED):
                await pub.publish("bench.js", payload)

        figures: dict[str, float] = {}
        for name, run, n in (
            ("js_publish_async", nats_py_pipelined, count),
            ("jspub_send", jspub_pipelined, count),
            ("js_publish", nats_py_awaited, AWAITED),
            ("jspub_publish", jspub_awaited, AWAITED),
        ):
            cpu, start = time.process_time(), time.perf_counter()
            await run()
            wall = time.perf_counter() - start
            figures[f"{name}_cpu_us"] = (time.process_time() - cpu) / n * 1e6
            figures[f"{name}_msgs_per_s"] = n / wall
        await pub.close()
        return figures
    finally:
        await nc.close()


async def postgres_rates(
    database_url: str, count: int, payload: dict[str, Any]
) -> tuple[float, float]:
    """(copy rows/s, executemany rows/s) into a table shaped like job_events."""
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(
            "CREATE TABLE ceiling (event_id text PRIMARY KEY, build_id bigint, seq int,"
            " status text, payload jsonb)"
        )
        # Binary jsonb (version byte 1, then the text): COPY's binary format needs it.
        await conn.set_type_codec(
            "jsonb",
            encoder=lambda v: b"\x01" + codec.dumps(v),
            decoder=lambda b: codec.loads(b[1:]),
            schema="pg_catalog",
            format="binary",
        )
        rows = [(f"{i}-1", i, 1, "SUCCESS", payload) for i in range(count)]
        start = time.perf_counter()
        await conn.copy_records_to_table("ceiling", records=rows)
        copy_rate = count / (time.perf_counter() - start)
        await conn.execute("TRUNCATE ceiling")
        start = time.perf_counter()
        async with conn.transaction():
            await conn.executemany(
                "INSERT INTO ceiling VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING", rows
            )
        many_rate = count / (time.perf_counter() - start)
        await conn.execute("DROP TABLE ceiling")
        return copy_rate, many_rate
    finally:
        await conn.close()


async def run(servers: Servers, size: int) -> Result:
    result = Result("ceiling", size)
    event = job_event(1, 3, "SUCCESS")
    payload = codec.dumps(event)
    async with running_stack(servers) as bench:
        url, db = bench.settings.nats_url, bench.settings.database_url
        core = await core_pub_sub(url, size, payload)
        publishing = await js_publish(url, size, payload)
        jsp = publishing["js_publish_async_msgs_per_s"]
        copy_rate, many_rate = await postgres_rates(db, size, event)
        ingest_size = min(size, INGEST_MAX)
        measured = await ingest.measure(bench, ingest_size - ingest_size % 3)
    rate = measured["events_per_s"]
    result.figures.update(
        {
            "messages": size,
            "nats_core_msgs_per_s": core,
            "js_publish_acked_msgs_per_s": jsp,
            **{k: v for k, v in publishing.items() if k != "js_publish_async_msgs_per_s"},
            "pg_copy_rows_per_s": copy_rate,
            "pg_executemany_rows_per_s": many_rate,
            "ingest_events": measured["events"],
            "ingest_events_per_s": rate,
            "ingest_vs_js_publish": rate / jsp,
            "ingest_vs_pg_copy": rate / copy_rate,
            "missing": measured["missing"],
        }
    )
    if measured["missing"]:
        result.problem(f"ingest beside the ceiling lost {measured['missing']}")
    result.notes.append(f"payload {len(payload)} bytes (a job_event); one Python client each")
    return result

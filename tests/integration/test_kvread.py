"""`kvread.latest` over real JetStream: every live key's latest value, deleted keys left
out, and nothing missing while keys are being written (as runners heartbeat): nats-py's
watcher, which it replaces for the scheduler's reads, left keys out of a few percent of
such reads."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import nats
import pytest
from nats.aio.client import Client
from nats.js.api import StorageType, StreamConfig

from services.common import bus, kvread
from services.common.config import Settings

BUCKET = "kvread-test"


@pytest.fixture
async def nc(settings: Settings) -> AsyncIterator[Client]:
    client = await nats.connect(settings.nats_url)
    yield client
    await client.close()


async def test_every_live_key_at_its_latest_value(nc: Client) -> None:
    js = nc.jetstream()
    kv = await bus.ensure_kv(js, BUCKET)
    for n in range(300):
        await kv.put(f"job.{n}", b"v1")
    await kv.put("job.7", b"v2")
    await kv.delete("job.8")
    await kv.put("other", b"x")
    entries = await kvread.latest(js, kv, BUCKET, "job.*")
    by_key = {e.key: e for e in entries}
    assert len(by_key) == 299 and "job.8" not in by_key and "other" not in by_key
    assert by_key["job.7"].value == b"v2"
    assert by_key["job.7"].revision == (await kv.get("job.7")).revision
    assert [e.revision for e in entries] == sorted(e.revision for e in entries)
    assert {e.key for e in await kvread.latest(js, kv, BUCKET)} == {*by_key, "other"}


async def test_an_empty_bucket_reads_empty(nc: Client) -> None:
    js = nc.jetstream()
    kv = await bus.ensure_kv(js, BUCKET)
    assert await kvread.latest(js, kv, BUCKET) == []


async def test_no_key_is_missed_while_keys_are_written(nc: Client, settings: Settings) -> None:
    js = nc.jetstream()
    kv = await bus.ensure_kv(js, BUCKET, ttl=30.0)
    writer = await nats.connect(settings.nats_url)
    wkv = await writer.jetstream().key_value(BUCKET)
    names = {f"runner-{n}" for n in range(3)}
    for name in names:
        await wkv.put(name, b"{}")
    stop = asyncio.Event()

    async def heartbeat(name: str) -> None:
        while not stop.is_set():
            await wkv.put(name, b"{}")

    writers = [asyncio.create_task(heartbeat(name)) for name in names]
    try:
        incomplete = 0
        for _ in range(200):
            if {e.key for e in await kvread.latest(js, kv, BUCKET)} != names:
                incomplete += 1
        assert incomplete == 0
    finally:
        stop.set()
        await asyncio.gather(*writers)
        await writer.close()


async def test_subjects_past_the_servers_page_limit_are_all_listed(nc: Client) -> None:
    # The server lists 100,000 subjects per answer; one more page must be asked for.
    js = nc.jetstream(publish_async_max_pending=4000)
    count = 100_050
    await js.add_stream(
        StreamConfig(name="MANY_SUBJECTS", subjects=["many.>"], storage=StorageType.MEMORY)
    )
    for i in range(count):
        await js.publish_async(f"many.k{i}", b"x")
    await js.publish_async_completed()
    first_page = await js.stream_info("MANY_SUBJECTS", subjects_filter="many.>")
    assert len(first_page.state.subjects or {}) < count  # what nats-py alone would see
    names = await kvread.stream_subjects(js, "MANY_SUBJECTS", "many.>")
    assert len(names) == count
    assert set(names) == {f"many.k{i}" for i in range(count)}

"""`kvread.latest` over real JetStream: every key's latest entry, all of them, deletes
flagged. (nats-py's watcher, which it replaces for the scheduler's reads, could say "done"
before the deliveries the server had counted arrived: a race of the server's own threads
that a test cannot provoke on demand; what is checked here is that nothing is left out.)"""

from __future__ import annotations

from collections.abc import AsyncIterator

import nats
import pytest
from nats.aio.client import Client

from services.common import bus
from services.common.config import Settings
from services.scheduler import kvread

BUCKET = "kvread-test"


@pytest.fixture
async def nc(settings: Settings) -> AsyncIterator[Client]:
    client = await nats.connect(settings.nats_url)
    yield client
    await client.close()


async def test_every_key_latest_value_and_deletes_flagged(nc: Client) -> None:
    js = nc.jetstream()
    kv = await bus.ensure_kv(js, BUCKET)
    for n in range(300):
        await kv.put(f"job.{n}", b"v1")
    await kv.put("job.7", b"v2")
    await kv.delete("job.8")
    await kv.put("other", b"x")
    entries = await kvread.latest(js, BUCKET, "job.*")
    by_key = {e.key: e for e in entries}
    assert len(by_key) == 300 and "other" not in by_key
    assert by_key["job.7"].value == b"v2"
    assert by_key["job.8"].deleted
    assert not any(e.deleted for k, e in by_key.items() if k != "job.8")
    assert by_key["job.7"].revision == (await kv.get("job.7")).revision
    assert {e.key for e in await kvread.latest(js, BUCKET)} == {*by_key, "other"}


async def test_an_empty_bucket_reads_at_once(nc: Client) -> None:
    js = nc.jetstream()
    await bus.ensure_kv(js, BUCKET)
    assert await kvread.latest(js, BUCKET) == []

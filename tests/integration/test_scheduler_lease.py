"""The scheduler's leader lease over a real JetStream KV bucket: one holder at a time, a
release or an expiry lets a standby in, a deposed holder cannot renew or write; and an
in-process scheduler that loses its lease stops answering until it holds it again."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import nats
import nats.errors
import pytest
from nats.aio.client import Client
from prometheus_client import REGISTRY

from services.common import bus, codec
from services.common.config import Settings
from services.scheduler.leader import LEASE_KEY, Lease, NotLeader
from tests.integration.test_scheduler_life import Events, Harness, submission
from tests.support import eventually


@pytest.fixture
async def nc(settings: Settings) -> AsyncIterator[Client]:
    client = await nats.connect(settings.nats_url)
    yield client
    await client.close()


async def _bucket(nc: Client, settings: Settings, ttl: float) -> Any:
    return await bus.ensure_kv(nc.jetstream(), settings.subjects.leader_bucket, ttl=ttl)


async def test_one_holder_release_lets_the_standby_in(nc: Client, settings: Settings) -> None:
    kv = await _bucket(nc, settings, ttl=30)
    a, b = Lease(kv, 30, holder="a"), Lease(kv, 30, holder="b")
    assert await a.try_acquire()
    assert not await b.try_acquire()
    assert codec.loads((await kv.get(LEASE_KEY)).value)["holder"] == "a"
    first = a.revision
    assert await a.renew() and a.revision != first
    a.check()  # holds: no exception
    with pytest.raises(NotLeader):
        b.check()

    await a.release()
    assert not a.held()
    with pytest.raises(NotLeader):
        a.check()
    assert await b.try_acquire()
    assert codec.loads((await kv.get(LEASE_KEY)).value)["holder"] == "b"


async def test_expiry_lets_the_standby_in_and_the_old_holder_cannot_renew(
    nc: Client, settings: Settings
) -> None:
    kv = await _bucket(nc, settings, ttl=1.0)
    a, b = Lease(kv, 1.0, holder="a"), Lease(kv, 1.0, holder="b")
    assert await a.try_acquire()
    assert not await b.try_acquire()
    # a stops renewing (a paused process): its own deadline passes before the key expires,
    # then b gets in by polling.
    await eventually(lambda: _true(not a.held()), timeout=5)
    assert await b.acquire(asyncio.Event())
    assert not await a.renew()
    assert a.revision is None
    assert b.held()


async def _true(value: bool) -> bool:
    return value


async def test_a_scheduler_that_loses_its_lease_stops_answering(settings: Settings) -> None:
    settings = replace(settings, leader_ttl_s=1.5)
    nc = await nats.connect(settings.nats_url)
    js = nc.jetstream()
    await bus.ensure_streams(js, settings)
    h = Harness(settings, nc, js, Events())
    await h.start()  # answers claims: it leads
    holding: asyncio.Task[None] | None = None
    try:
        kv = await _bucket(nc, settings, ttl=1.5)
        usurper = Lease(kv, 1.5, holder="usurper")
        # Take the lease away behind its back, as a standby would after an expiry.
        await kv.delete(LEASE_KEY)
        assert await usurper.try_acquire()
        # It renews, as a leader does: with a key left to expire (TTL 1.5 s) the deposed
        # scheduler would lead again before the checks below, on a slow machine.
        letting_go = asyncio.Event()
        holding = asyncio.create_task(usurper.hold(letting_go))

        async def silent() -> bool:
            try:
                await h.claim(10**9, "probe")
            except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
                return True
            return False

        await eventually(silent, timeout=10)
        # It stops answering first (stand-down drops the claim subscription at once), and
        # says so in its gauge a moment later.
        await eventually(
            lambda: _true(REGISTRY.get_sample_value("xoogify_scheduler_leader") == 0), timeout=10
        )
        # Deposed, it takes no submission either.
        build_id = await h.submit(submission())
        assert await _untouched(kv, js, settings, build_id)

        # Once the usurper lets go, it leads again and admits what waited.
        assert usurper.held()
        letting_go.set()
        await holding
        await usurper.release()
        sched = await js.key_value(settings.subjects.sched_bucket)
        await eventually(lambda: _stored(sched, build_id), timeout=15)
        holder = codec.loads((await kv.get(LEASE_KEY)).value)["holder"]
        assert holder != "usurper"
        assert REGISTRY.get_sample_value("xoogify_scheduler_leader") == 1
    finally:
        if holding is not None:
            holding.cancel()
        await h.halt()
        await nc.close()


async def _untouched(kv: Any, js: Any, settings: Settings, build_id: int) -> bool:
    """While the usurper holds the lease, the submission stays unacknowledged."""
    info = await js.consumer_info(settings.subjects.submit_stream, "scheduler-submit")
    sched = await js.key_value(settings.subjects.sched_bucket)
    try:
        await sched.get(f"job.{build_id}")
    except Exception:
        return bool(info.ack_floor.stream_seq < build_id)
    return False


async def _stored(sched: Any, build_id: int) -> bool:
    try:
        await sched.get(f"job.{build_id}")
    except Exception:
        return False
    return True

"""`inputs.Inputs` over real JetStream: one pull request open at a time (not one more per
call, which piled up and multiplied on expiry), inputs stored while a batch is handled
are already in hand for the next call, and a deleted consumer is said so."""

from __future__ import annotations

from collections.abc import AsyncIterator

import nats
import pytest
from nats.aio.client import Client
from nats.js.api import AckPolicy, ConsumerConfig

from services.common import bus
from services.common.config import Settings
from services.scheduler.inputs import ConsumerGone, Inputs
from tests.support import eventually

CONSUMER = "inputs-test"


@pytest.fixture
async def nc(settings: Settings) -> AsyncIterator[Client]:
    client = await nats.connect(settings.nats_url)
    js = client.jetstream()
    await bus.ensure_streams(js, settings)
    s = settings.subjects
    config = ConsumerConfig(
        durable_name=CONSUMER, filter_subject=s.submit, ack_policy=AckPolicy.EXPLICIT
    )
    await js.add_consumer(s.submit_stream, config)
    yield client
    await client.close()


async def waiting(nc: Client, settings: Settings) -> int:
    info = await nc.jetstream().consumer_info(settings.subjects.submit_stream, CONSUMER)
    return int(info.num_waiting or 0)


async def test_one_request_stays_open_and_brings_the_next_batch(
    nc: Client, settings: Settings
) -> None:
    s = settings.subjects
    js = nc.jetstream()
    inputs = Inputs(nc, s.submit_stream, CONSUMER, batch=64, expires_s=30.0)
    await inputs.start()
    try:
        await js.publish(s.submit, b"1")
        [first] = await inputs.fetch(timeout=30.0)
        assert first.data == b"1"
        # Stored while "1" is being handled: delivered on the request already open.
        await js.publish(s.submit, b"2")
        await js.publish(s.submit, b"3")

        async def two_in_hand() -> bool:
            return len(inputs._msgs) == 2

        await eventually(two_in_hand, timeout=10)
        assert [m.data for m in await inputs.fetch(timeout=30.0)] == [b"2", b"3"]
        for _ in range(3):
            await js.publish(s.submit, b"more")
            assert len(await inputs.fetch(timeout=30.0)) == 1
        assert await waiting(nc, settings) == 1
    finally:
        await inputs.stop()


async def test_a_request_over_is_followed_by_one_new_one(nc: Client, settings: Settings) -> None:
    s = settings.subjects
    inputs = Inputs(nc, s.submit_stream, CONSUMER, batch=64, expires_s=0.2)
    await inputs.start()
    try:
        for _ in range(5):
            # Each call ends when its request expires (408) or times out.
            assert await inputs.fetch(timeout=5.0) == []
        assert await waiting(nc, settings) <= 1
        await nc.jetstream().publish(s.submit, b"late")
        assert [m.data for m in await inputs.fetch(timeout=30.0)] == [b"late"]
    finally:
        await inputs.stop()


async def test_a_deleted_consumer_is_reported(nc: Client, settings: Settings) -> None:
    s = settings.subjects
    inputs = Inputs(nc, s.submit_stream, CONSUMER, batch=64, expires_s=30.0)
    await inputs.start()
    try:
        assert await inputs.fetch(timeout=0.2) == []
        await nc.jetstream().delete_consumer(s.submit_stream, CONSUMER)
        with pytest.raises(ConsumerGone):
            for _ in range(50):
                await inputs.fetch(timeout=1.0)
    finally:
        await inputs.stop()

"""`pull.PullReader` over real JetStream, the one reader of ingestion, the scheduler's
inputs and the runners' dispatch: one pull request open at a time (not one more per call,
which piled up and multiplied on expiry), messages stored while a batch is handled are
already in hand for the next call, a deleted consumer is said so, and deliveries taken as
raw bytes (routed past nats-py's `Msg`) are the same as through nats-py's callback."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import nats
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig

from services.common import bus
from services.common.config import Settings
from services.common.pull import RAW_ROUTING, ConsumerGone, Delivery, PullReader, reply_stream_seq
from tests.support import eventually

CONSUMER = "inputs-test"
STREAM = "PULLER_TEST"


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
    reader = PullReader(nc, s.submit_stream, CONSUMER, batch=64, expires_s=30.0)
    await reader.start()
    try:
        await js.publish(s.submit, b"1")
        [first] = await reader.fetch(timeout=30.0)
        assert first.data == b"1"
        # Stored while "1" is being handled: delivered on the request already open.
        await js.publish(s.submit, b"2")
        await js.publish(s.submit, b"3")

        async def two_in_hand() -> bool:
            return reader.in_hand == 2

        await eventually(two_in_hand, timeout=10)
        assert [m.data for m in await reader.fetch(timeout=30.0)] == [b"2", b"3"]
        for _ in range(3):
            await js.publish(s.submit, b"more")
            assert len(await reader.fetch(timeout=30.0)) == 1
        assert await waiting(nc, settings) == 1
    finally:
        await reader.stop()


async def test_a_request_over_is_followed_by_one_new_one(nc: Client, settings: Settings) -> None:
    s = settings.subjects
    reader = PullReader(nc, s.submit_stream, CONSUMER, batch=64, expires_s=0.2)
    await reader.start()
    try:
        for _ in range(5):
            # Each call ends when its request expires (408) or times out.
            assert await reader.fetch(timeout=5.0) == []
        assert await waiting(nc, settings) <= 1
        await nc.jetstream().publish(s.submit, b"late")
        assert [m.data for m in await reader.fetch(timeout=30.0)] == [b"late"]
    finally:
        await reader.stop()


async def test_a_deleted_consumer_is_reported(nc: Client, settings: Settings) -> None:
    s = settings.subjects
    reader = PullReader(nc, s.submit_stream, CONSUMER, batch=64, expires_s=30.0)
    await reader.start()
    try:
        assert await reader.fetch(timeout=0.2) == []
        await nc.jetstream().delete_consumer(s.submit_stream, CONSUMER)
        with pytest.raises(ConsumerGone):
            for _ in range(50):
                await reader.fetch(timeout=1.0)
    finally:
        await reader.stop()


async def test_a_missing_consumer_is_reported(nc: Client, settings: Settings) -> None:
    s = settings.subjects
    reader = PullReader(nc, s.submit_stream, "no-such-consumer", batch=8, expires_s=5.0)
    await reader.start()
    try:
        with pytest.raises(ConsumerGone, match="503"):
            await reader.fetch(timeout=5.0)
    finally:
        await reader.stop()


async def test_requests_never_answered_say_the_reader_must_start_over(
    nc: Client, settings: Settings
) -> None:
    s = settings.subjects
    reader = PullReader(nc, s.submit_stream, CONSUMER, batch=8, expires_s=0.1)
    await reader.start()
    try:
        assert await reader.fetch(timeout=5.0) == []
        # The inbox gone (as after a reconnect that lost it): no request is ever answered.
        assert reader._sub is not None
        await reader._sub.unsubscribe()
        with pytest.raises(ConsumerGone, match="no answer"):
            for _ in range(20):
                await reader.fetch(timeout=0.7)
    finally:
        await reader.stop()


async def test_replies_reach_the_consumer(nc: Client, settings: Settings) -> None:
    s = settings.subjects
    js = nc.jetstream()
    reader = PullReader(nc, s.submit_stream, CONSUMER, batch=3, expires_s=5.0)
    await reader.start()
    try:
        for body in (b"acked", b"naked", b"termed"):
            await js.publish(s.submit, body)
        got: list[Delivery] = []
        while len(got) < 3:
            got += await reader.fetch(timeout=10.0)
        by_data = {d.data: d for d in got}
        await by_data[b"acked"].ack()
        await by_data[b"termed"].in_progress()
        await by_data[b"termed"].term()
        await by_data[b"termed"].ack()  # a second final reply is not sent
        await by_data[b"naked"].nak()
        # Handed back at once: delivered again to the same reader.
        [again] = await reader.fetch(timeout=10.0)
        assert again.data == b"naked" and again.stream_seq == by_data[b"naked"].stream_seq
        await again.ack()
        await nc.flush()

        async def nothing_pending() -> bool:
            info = await js.consumer_info(s.submit_stream, CONSUMER)
            return info.num_ack_pending == 0 and info.num_pending == 0

        await eventually(nothing_pending, timeout=10)
    finally:
        await reader.stop()


async def _pull_everything(settings: Settings, raw: bool, count: int) -> list[Delivery]:
    nc = await nats.connect(settings.nats_url)
    try:
        js = nc.jetstream()
        await js.add_stream(name=STREAM, subjects=["pt.>"])
        consumer = f"c-{'raw' if raw else 'msg'}"
        config = ConsumerConfig(durable_name=consumer, ack_policy=AckPolicy.EXPLICIT)
        await js.add_consumer(STREAM, config)
        for i in range(count):
            await js.publish(
                f"pt.{i % 3}", f"payload {i}".encode(), headers={"Nats-Msg-Id": str(i)}
            )
        # Another subscription on the same connection, as the hub's is beside ingestion's.
        others: list[Msg] = []
        other_came = asyncio.Event()

        async def other(msg: Msg) -> None:
            others.append(msg)
            other_came.set()

        await nc.subscribe("elsewhere", cb=other)
        reader = PullReader(nc, STREAM, consumer, batch=7, expires_s=0.3)
        await reader.start(raw=raw)
        assert reader.raw is (raw and RAW_ROUTING)
        got: list[Delivery] = []
        while len(got) < count:
            batch = await reader.fetch(timeout=2)
            assert batch, "the stream holds more than was fetched"
            assert len(batch) <= 7
            got += batch
            for d in batch:
                await d.ack()
        await nc.publish("elsewhere", b"hello", headers={"X": "1"})
        await nc.flush()
        # Nothing left: the open request expires, and the call comes back empty.
        assert await reader.fetch(timeout=1.0) == []
        await asyncio.wait_for(other_came.wait(), 10)
        assert others[0].data == b"hello" and others[0].headers == {"X": "1"}
        await reader.stop()
        info = await js.consumer_info(STREAM, consumer)
        assert info.num_ack_pending == 0 and info.delivered.stream_seq == count
        return got
    finally:
        await nc.close()


@pytest.mark.parametrize("raw", [True, False])
async def test_deliveries_are_the_same_raw_or_through_msg(settings: Settings, raw: bool) -> None:
    got = await _pull_everything(settings, raw, 25)
    assert [reply_stream_seq(d.reply) for d in got] == list(range(1, 26))
    assert [d.subject for d in got] == [f"pt.{i % 3}" for i in range(25)]
    assert [d.data for d in got] == [f"payload {i}".encode() for i in range(25)]


def test_raw_routing_matches_this_nats_py() -> None:
    # If nats-py changes the internals the routing relies on, the readers fall back to
    # `Msg`s (correct, slower): this says so instead of letting it pass unnoticed.
    assert RAW_ROUTING

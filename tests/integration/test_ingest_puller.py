"""The ingestion `Puller` against a real JetStream: deliveries taken as raw bytes (routed
past nats-py's `Msg`) are the same as through nats-py's callback, other subscriptions on
the same connection are untouched, and a consumer with nothing to give answers at once."""

from __future__ import annotations

import asyncio

import nats
import pytest
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig

from services.common.config import Settings
from services.common.pull import ACK, RAW_ROUTING, Delivery, Puller, reply_stream_seq

STREAM = "PULLER_TEST"


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
        puller = Puller(nc, STREAM, consumer)
        await puller.start(raw=raw)
        assert puller.raw is (raw and RAW_ROUTING)
        got: list[Delivery] = []
        while len(got) < count:
            batch = await puller.fetch(7, timeout=2)
            assert batch, "the stream holds more than was fetched"
            got += batch
            for d in batch:
                await puller.reply(d, ACK)
        await nc.publish("elsewhere", b"hello", headers={"X": "1"})
        await nc.flush()
        # Nothing left: answered at once by the server's "no messages", then an empty poll.
        assert await puller.fetch(7, timeout=0.3) == []
        await asyncio.wait_for(other_came.wait(), 10)
        assert others[0].data == b"hello" and others[0].headers == {"X": "1"}
        await puller.stop()
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
    # If nats-py changes the internals the routing relies on, ingestion falls back to
    # `Msg`s (correct, slower): this says so instead of letting it pass unnoticed.
    assert RAW_ROUTING

"""The hub's ordered consumer read as raw deliveries: events in consumer order reach the
flush, a gap (a delivery or a heartbeat says one was missed) starts a new consumer and
drops the rest of the old one, flow control is answered."""

from __future__ import annotations

import asyncio
from typing import cast

import pytest

from services.common import codec
from services.common.config import Settings
from services.common.pull import RawSubscription, ack_sequences, header_value
from services.gateway.context import GatewayContext
from services.gateway.hub import Hub
from tests.unit.test_hub_live_client import job

SUBJECT = b"xoogify.events.acme.stg.1"


class _Nc:
    def __init__(self) -> None:
        self.published: list[str] = []

    async def publish(self, subject: str, payload: bytes = b"") -> None:
        self.published.append(subject)


class _Sub:
    async def unsubscribe(self) -> None:
        pass


class _Ctx:
    settings = Settings()

    def __init__(self) -> None:
        self.nc = _Nc()


class _Hub(Hub):
    """A hub whose raw consumer is routed, recording restarts instead of resubscribing."""

    def __init__(self) -> None:
        super().__init__(cast(GatewayContext, _Ctx()))
        self._sub = RawSubscription(_Sub(), lambda: None)
        self.why: list[str] = []
        self.restarted = asyncio.Event()

    async def restart(self, why: str) -> None:
        self.why.append(why)
        self.restarted.set()


def reply(stream_seq: int, consumer_seq: int) -> bytes:
    return f"$JS.ACK.XOOGIFY_EVENTS.hub.1.{stream_seq}.{consumer_seq}.1700000000.0".encode()


def deliver(h: Hub, stream_seq: int, consumer_seq: int) -> None:
    data = codec.dumps(job(stream_seq, 1))
    h._on_raw(SUBJECT, reply(stream_seq, consumer_seq), data, None)


def heartbeat(last_consumer: int, stalled: str | None = None) -> bytes:
    lines = ["NATS/1.0 100 Idle Heartbeat", f"Nats-Last-Consumer: {last_consumer}"]
    if stalled is not None:
        lines.append(f"Nats-Consumer-Stalled: {stalled}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def test_reply_subjects_give_stream_and_consumer_sequences() -> None:
    assert ack_sequences(reply(17, 5)) == (17, 5)
    v2 = b"$JS.ACK.hub-domain.ACCOUNT.XOOGIFY_EVENTS.hub.1.17.5.1700000000.0.token"
    assert ack_sequences(v2) == (17, 5)
    with pytest.raises(ValueError):
        ack_sequences(b"_INBOX.abc")


def test_a_header_value_is_read_from_the_raw_block() -> None:
    block = heartbeat(12, stalled="$JS.FC.x.y")
    assert header_value(block, b"Nats-Last-Consumer:") == b"12"
    assert header_value(block, b"Nats-Consumer-Stalled:") == b"$JS.FC.x.y"
    assert header_value(block, b"Nats-Pending:") is None


async def test_deliveries_in_consumer_order_are_dispatched() -> None:
    h = _Hub()
    for n in (1, 2, 3):
        deliver(h, stream_seq=10 + n, consumer_seq=n)
    h._on_raw(b"", b"", b"", heartbeat(3))  # agrees: nothing was missed
    assert h.received_seq == 13
    assert h.why == []


async def test_a_skipped_consumer_sequence_restarts_after_the_last_event_taken() -> None:
    h = _Hub()
    deliver(h, stream_seq=11, consumer_seq=1)
    deliver(h, stream_seq=13, consumer_seq=3)  # 2 never came
    await asyncio.wait_for(h.restarted.wait(), 5)
    assert h.received_seq == 11  # the new consumer starts at 12
    assert len(h.why) == 1
    # The rest of the old consumer's deliveries are dropped, not taken out of order; the
    # restart is asked for once.
    assert not h._sub.raw


async def test_a_heartbeat_naming_a_delivery_never_received_is_a_gap() -> None:
    h = _Hub()
    deliver(h, stream_seq=11, consumer_seq=1)
    h._on_raw(b"", b"", b"", heartbeat(2))
    await asyncio.wait_for(h.restarted.wait(), 5)
    assert h.received_seq == 11


async def test_flow_control_is_answered() -> None:
    h = _Hub()
    nc = cast(_Ctx, h.ctx).nc
    request = b"NATS/1.0 100 FlowControl Request\r\n\r\n"
    h._on_raw(b"_INBOX.hub", b"$JS.FC.XOOGIFY_EVENTS.a.1", b"", request)
    h._on_raw(b"", b"", b"", heartbeat(0, stalled="$JS.FC.XOOGIFY_EVENTS.b.2"))
    await asyncio.gather(*h._tasks)
    assert nc.published == ["$JS.FC.XOOGIFY_EVENTS.a.1", "$JS.FC.XOOGIFY_EVENTS.b.2"]
    assert h.why == []

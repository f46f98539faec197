"""The hub's flushes: events are handed to every socket in stream order, in one wake-up
per flush; `last_seq` (a `hello`'s watermark) covers only what was handed over; a bad
event is counted and skipped."""

from __future__ import annotations

import asyncio
from typing import Any, cast

from services.common import codec
from services.common.config import Settings
from services.gateway.context import GatewayContext
from services.gateway.hub import Hub
from tests.unit.test_hub_live_client import job


class _Ctx:
    settings = Settings()


def hub() -> Hub:
    return Hub(cast(GatewayContext, _Ctx()))


def data(build_id: int, seq: int = 1, **kw: Any) -> bytes:
    return codec.dumps(job(build_id, seq, **kw))


async def test_events_reach_every_socket_in_order_once() -> None:
    h = hub()
    a, b = h.register(), h.register()
    for seq in (1, 2, 3):
        h.dispatch(seq, "xoogify.events.acme.stg.1", data(seq))
    h.dispatch(2, "xoogify.events.acme.stg.1", data(2))  # a restarted consumer's overlap
    assert h.received_seq == 3
    await asyncio.wait_for(a.wake.wait(), 5)
    await asyncio.wait_for(b.wake.wait(), 5)
    assert h.last_seq == 3
    assert [i.stream_seq for i in a.take()] == [1, 2, 3]
    assert [i.stream_seq for i in b.take()] == [1, 2, 3]


async def test_a_socket_registered_before_the_flush_gets_what_its_hello_did_not_cover() -> None:
    h = hub()
    h.dispatch(1, "s", data(1))
    h.dispatch(2, "s", data(2))
    watermark = h.last_seq  # what a hello would say now
    late = h.register()
    await asyncio.wait_for(late.wake.wait(), 5)
    assert [i.stream_seq for i in late.take()] == [s for s in (1, 2) if s > watermark]


async def test_a_bad_event_is_counted_and_skipped() -> None:
    h = hub()
    client = h.register()
    h.dispatch(1, "s", b"{not json")
    h.dispatch(2, "s", codec.dumps({"build_id": 2}))
    h.dispatch(3, "s", data(3, status="BOGUS"))
    h.dispatch(4, "s", data(4))
    await asyncio.wait_for(client.wake.wait(), 5)
    assert h.rejected == 3
    assert [i.stream_seq for i in client.take()] == [4]


async def test_final_status_is_known_before_the_flush() -> None:
    h = hub()
    fut = h.final_status(7)
    h.register()
    h.dispatch(1, "s", data(7, seq=3, status="SUCCESS"))
    assert fut.done() and fut.result() == "SUCCESS"
    await h.stop()

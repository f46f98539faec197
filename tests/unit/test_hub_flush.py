"""The hub's flushes: events are handed to every socket in stream order, in one wake-up
per flush; `last_seq` (a `hello`'s watermark) covers only what was handed over; a bad
event is counted and skipped."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import pytest

from services.common import codec
from services.common.config import Settings
from services.gateway.context import GatewayContext
from services.gateway.hub import FLUSH_PER_CLIENT_S, GROUPS, Hub
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


def step(h: Hub) -> None:
    """One flush now, instead of at its timer (the test drives the turns)."""
    if h._flush_at is not None:
        h._flush_at.cancel()
    h.flush()


def seqs(client: Any) -> list[int]:
    return [i.stream_seq for i in client.take()]


async def test_groups_are_flushed_in_turn_each_socket_gets_everything_after_its_hello() -> None:
    h = hub()
    clients = [h.register() for _ in range(2 * GROUPS)]
    assert {h.watermark(c) for c in clients} == {0}
    for seq in (1, 2, 3):
        h.dispatch(seq, "s", data(seq))
    step(h)
    # One group, two sockets, got the three events; the others wait for their turn.
    got = [c for c in clients if c.queue]
    assert len(got) == 2 and all(h.watermark(c) == 3 for c in got)
    assert h.last_seq == 0  # not every socket has them yet
    for _ in range(GROUPS - 1):
        step(h)
    assert all(seqs(c) == [1, 2, 3] for c in clients)
    assert h.last_seq == 3 and h._pending == []  # handed to every group: dropped

    # A socket joining a group that is behind gets what came after its own hello.
    h.dispatch(4, "s", data(4))
    step(h)
    late = h.register()
    hello = h.watermark(late)
    h.dispatch(5, "s", data(5))
    for _ in range(GROUPS):
        step(h)
    assert seqs(late) == [s for s in (4, 5) if s > hello]
    assert all(seqs(c) == [4, 5] for c in clients)
    await h.stop()


async def test_a_late_turn_does_not_push_the_next_one_back() -> None:
    h = hub()
    for _ in range(2 * GROUPS):
        h.register()
    spacing = 2 * GROUPS * FLUSH_PER_CLIENT_S
    h.dispatch(1, "s", data(1))
    # The first group's turn was due a millisecond ago and runs only now (a busy loop).
    assert h._flush_at is not None
    h._flush_at.cancel()
    due = asyncio.get_running_loop().time() - 0.001
    h._flush_due = due
    h.flush()
    # The next group's turn counts from when the late one was due, not from now.
    assert h._flush_due == pytest.approx(due + spacing / GROUPS, abs=1e-9)
    await h.stop()

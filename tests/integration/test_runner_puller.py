"""`dispatch.Puller` (a `pull.PullReader` per kind) over real JetStream: a runner
serving two kinds takes one message at a time from whichever kind has one, and hands back
at once what it cannot take (so another runner gets it now, not after the consumer's 30 s
ack wait)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import nats
import pytest
from nats.aio.client import Client
from nats.js import JetStreamContext

from services.common import bus
from services.common.config import Settings
from services.runner import dispatch

ARCH = "amd64"
# Far below the consumers' ack wait (dispatch.ACK_WAIT_S): a message that came back within
# it was handed back, not left to expire.
HANDED_BACK_WITHIN_S = 10.0


@pytest.fixture
async def nc(settings: Settings) -> AsyncIterator[Client]:
    client = await nats.connect(settings.nats_url)
    await bus.ensure_streams(client.jetstream(), settings)
    yield client
    await client.close()


async def consumers(nc: Client, settings: Settings) -> list[tuple[str, str]]:
    return await dispatch.ensure_consumers(nc.jetstream(), settings, ARCH, ["terraform", "script"])


async def another_runner(
    nc: Client, settings: Settings, kind: str
) -> JetStreamContext.PullSubscription:
    """A plain nats-py reader of one kind's consumer, standing in for another runner."""
    js = nc.jetstream()
    name = await dispatch.ensure_consumer(js, settings, ARCH, kind)
    return await js.pull_subscribe_bind(name, stream=settings.subjects.dispatch_stream)


async def publish(nc: Client, settings: Settings, kind: str, body: bytes) -> None:
    await nc.jetstream().publish(settings.subjects.dispatch(ARCH, kind), body)


async def test_a_job_of_the_second_kind_is_taken_while_the_first_is_empty(
    nc: Client, settings: Settings
) -> None:
    # A long wait per fetch: asked in turn, the script message would wait behind it.
    puller = dispatch.Puller(nc, await consumers(nc, settings), timeout_s=60.0)
    await publish(nc, settings, "script", b"s1")
    try:
        [msg] = await puller.next()
        assert msg.data == b"s1"
        await msg.ack()
    finally:
        # The terraform request is still open (60 s): closing must not wait for it to expire
        # unless it brings something, and nothing else may be left.
        await publish(nc, settings, "terraform", b"t-late")
        await puller.close()
    other = await another_runner(nc, settings, "terraform")
    [back] = await other.fetch(1, timeout=HANDED_BACK_WITHIN_S)
    assert back.data == b"t-late"


async def test_what_comes_while_busy_goes_back_to_other_runners(
    nc: Client, settings: Settings
) -> None:
    puller = dispatch.Puller(nc, await consumers(nc, settings), timeout_s=2.0)
    await publish(nc, settings, "script", b"s1")
    [first] = await puller.next()
    assert first.data == b"s1"
    # Busy with s1 now; the fetch on terraform is still out and takes this one...
    await publish(nc, settings, "terraform", b"t1")
    # ...and hands it back: another runner's fetch gets it long before the ack wait.
    other = await another_runner(nc, settings, "terraform")
    [taken] = await other.fetch(1, timeout=HANDED_BACK_WITHIN_S)
    assert taken.data == b"t1"
    await taken.ack()
    await first.ack()
    await puller.close()
    # Not busy any more: the next message is the puller's own.
    await publish(nc, settings, "terraform", b"t2")
    [mine] = await puller.next()
    assert mine.data == b"t2"
    await puller.close()


async def test_one_at_a_time_when_both_kinds_have_work(nc: Client, settings: Settings) -> None:
    await publish(nc, settings, "terraform", b"t1")
    await publish(nc, settings, "script", b"s1")
    puller = dispatch.Puller(nc, await consumers(nc, settings), timeout_s=2.0)
    got = []
    for _ in range(2):
        msgs = await puller.next()
        assert len(msgs) == 1
        got.append(msgs[0].data)
        await msgs[0].ack()
    await puller.close()
    assert sorted(got) == [b"s1", b"t1"]

"""`JsPublisher` against a real nats-server: the same acks and the same errors as nats-py's
`js.publish` (duplicates, a lost compare-and-set, no stream), a timeout when nothing
answers, many publishes in flight, publishing again after the server restarted, and the
scheduler's record writes (`JobStore`) through it."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import nats
import pytest
from nats.aio.client import Client
from nats.errors import ConnectionClosedError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.errors import (
    APIError,
    KeyNotFoundError,
    KeyWrongLastSequenceError,
    NoStreamResponseError,
)

from services.common import bus, codec
from services.common.embedded import EmbeddedNats
from services.common.jspub import Ack, JsPublisher, kv_subject
from services.common.pull import RAW_ROUTING
from services.common.subjects import Subjects
from services.scheduler.store import JobStore

STREAM = "JSPUB_TEST"
BUCKET = "jspub-test"


def _url(nats_server: EmbeddedNats | None) -> str:
    return nats_server.url if nats_server else os.environ["XOOGIFY_TEST_NATS_URL"]


@pytest.fixture
async def nc(nats_server: EmbeddedNats | None) -> AsyncIterator[Client]:
    client = await nats.connect(_url(nats_server))
    await client.jetstream().add_stream(name=STREAM, subjects=["jp.>"])
    yield client
    await client.close()


@pytest.fixture(params=[True, False], ids=["raw", "msg"])
async def pub(nc: Client, request: pytest.FixtureRequest) -> AsyncIterator[JsPublisher]:
    publisher = JsPublisher(nc)
    await publisher.start(raw=request.param)
    assert publisher.raw is (request.param and RAW_ROUTING)
    yield publisher
    await publisher.close()


async def test_acks_and_duplicates_are_js_publish_s(nc: Client, pub: JsPublisher) -> None:
    js = nc.jetstream()
    assert await pub.publish("jp.a", b"1") == Ack(STREAM, 1, False)
    assert (await js.publish("jp.a", b"2")).seq == 2
    headers = {"Nats-Msg-Id": "m-1"}
    assert await pub.publish("jp.b", b"3", headers=headers) == Ack(STREAM, 3, False)
    assert await pub.publish("jp.b", b"3", headers=headers) == Ack(STREAM, 3, True)
    theirs = await js.publish("jp.b", b"3", headers=headers)
    assert (theirs.seq, theirs.duplicate) == (3, True)
    assert pub.in_flight == 0


async def test_a_lost_compare_and_set_raises_what_kv_update_raises(
    nc: Client, pub: JsPublisher
) -> None:
    kv = await bus.ensure_kv(nc.jetstream(), BUCKET)
    subject = kv_subject(BUCKET, "job.1")
    first = await pub.update(subject, b"v1", last=0)
    assert (await kv.get("job.1")).revision == first
    second = await pub.update(subject, b"v2", last=first)
    entry = await kv.get("job.1")
    assert (entry.revision, entry.value) == (second, b"v2")
    with pytest.raises(KeyWrongLastSequenceError) as ours:
        await pub.update(subject, b"v3", last=first)
    with pytest.raises(KeyWrongLastSequenceError) as theirs:
        await kv.update("job.1", b"v3", last=first)
    assert str(ours.value) == str(theirs.value)
    with pytest.raises(KeyWrongLastSequenceError):
        await pub.update(subject, b"again", last=0)  # a create of a key that exists
    assert (await kv.get("job.1")).value == b"v2"


async def test_an_error_ack_is_the_api_error_js_publish_raises(
    nc: Client, pub: JsPublisher
) -> None:
    await pub.publish("jp.c", b"x")
    wrong = {"Nats-Expected-Last-Sequence": "999"}
    with pytest.raises(APIError) as ours:
        await pub.publish("jp.c", b"y", headers=wrong)
    with pytest.raises(APIError) as theirs:
        await nc.jetstream().publish("jp.c", b"y", headers=wrong)
    assert type(ours.value) is type(theirs.value)
    assert (ours.value.code, ours.value.err_code) == (theirs.value.code, theirs.value.err_code)
    assert ours.value.err_code == 10071


async def test_no_stream_is_no_stream_response(pub: JsPublisher) -> None:
    with pytest.raises(NoStreamResponseError):
        await pub.publish("nostream.here", b"x")


async def test_no_answer_is_a_timeout(nc: Client, pub: JsPublisher) -> None:
    # A core subscriber that never answers: the server has a responder, so no 503.
    await nc.subscribe("silent.one")
    await nc.flush()
    with pytest.raises(NatsTimeoutError):
        await pub.publish("silent.one", b"x", timeout=0.1)
    assert pub.in_flight == 0
    assert (await pub.publish("jp.after", b"x")).stream == STREAM


async def test_many_in_flight_through_a_small_window(nc: Client) -> None:
    publisher = JsPublisher(nc, window=10)
    await publisher.start()
    try:
        futures = [await publisher.send(f"jp.{n % 5}", str(n).encode()) for n in range(500)]
        assert publisher.in_flight <= 10
        acks = [await future for future in futures]
    finally:
        await publisher.close()
    assert [ack.seq for ack in acks] == list(range(1, 501))


async def test_close_fails_what_is_outstanding(nc: Client) -> None:
    publisher = JsPublisher(nc)
    await publisher.start()
    await nc.subscribe("silent.two")
    future = await publisher.send("silent.two", b"x")
    await publisher.close()
    with pytest.raises(ConnectionClosedError):
        await future
    with pytest.raises(ConnectionClosedError):
        await publisher.publish("jp.closed", b"x")


async def test_publishing_goes_on_after_a_server_restart(tmp_path: Path) -> None:
    # A server of its own, whatever the suite's is: this one is killed and started again.
    nats_server = EmbeddedNats(tmp_path / "own-nats", log_file=tmp_path / "own-nats.log").start()
    reconnected = asyncio.Event()

    async def on_reconnect() -> None:
        reconnected.set()

    nc = await nats.connect(
        nats_server.url, max_reconnect_attempts=-1, reconnect_time_wait=0.1,
        reconnected_cb=on_reconnect,
    )  # fmt: skip
    publisher = JsPublisher(nc, timeout=1.0)
    try:
        await nc.jetstream().add_stream(name=STREAM, subjects=["jp.>"])
        await publisher.start()
        assert (await publisher.publish("jp.before", b"x")).seq == 1
        nats_server.kill()
        # Sent while the server is away: acked once it is back, or timed out; never hung.
        during = await publisher.send("jp.during", b"y", headers={"Nats-Msg-Id": "during"})
        await asyncio.to_thread(nats_server.start)
        await asyncio.wait_for(reconnected.wait(), 30)
        try:
            await during
        except NatsTimeoutError:
            pass
        # The inbox is subscribed again: a retry under the same id is acked, once.
        retried = await publisher.publish("jp.during", b"y", headers={"Nats-Msg-Id": "during"})
        after = await publisher.publish("jp.after", b"z")
        assert (retried.seq, after.seq) == (2, 3)
        assert publisher.in_flight == 0
    finally:
        await publisher.close()
        await nc.close()
        nats_server.stop()


async def test_the_scheduler_s_record_writes_through_it(nc: Client, pub: JsPublisher) -> None:
    subjects = Subjects("jspub")
    kv = await bus.ensure_kv(nc.jetstream(), subjects.sched_bucket)
    store = JobStore(kv, nc.jetstream(), pub, subjects)
    await store.save(1, {"v": 1})  # create
    await store.save(1, {"v": 2})  # compare-and-set on the revision it got
    assert (await kv.get("job.1")).revision == store.revisions[1]
    await store.delete(1)
    with pytest.raises(KeyNotFoundError):  # what kv.get says of a deleted key
        await kv.get("job.1")
    await store.save(1, {"v": 3})  # a create over the delete marker
    assert codec.loads((await kv.get("job.1")).value) == {"v": 3}
    await kv.put("job.1", b"{}")  # another writer
    with pytest.raises(KeyWrongLastSequenceError):
        await store.save(1, {"v": 4})
    store.revisions.pop(1)
    with pytest.raises(KeyWrongLastSequenceError):
        await store.save(1, {"v": 5})  # a create of a live key
    assert (await kv.get("job.1")).value == b"{}"

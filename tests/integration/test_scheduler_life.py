"""The scheduler over real NATS JetStream, started in-process; the test plays gateway and
runner: it publishes submissions, pulls dispatch messages, claims, reports, cancels, and
reads the status events off XOOGIFY_EVENTS."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from typing import Any

import nats
import nats.js.errors
import pytest
from nats.aio.client import Client
from nats.js import JetStreamContext
from prometheus_client import REGISTRY

from services.common import bus, codec, schemas
from services.common.config import Settings
from services.common.timefmt import now_iso
from services.scheduler.service import run
from tests.support import eventually

FINAL = {"SUCCESS", "FAILURE"}


def submission(**over: Any) -> dict[str, Any]:
    message = {
        "organization": "acme",
        "environment": "stg",
        "module_type": "amd64/script",
        "module_name": "hello",
        "action": "PLAN",
        "variables": {"who": "world", "token": "s3cret"},
        "sensitive": ["token"],
        "timeout_s": None,
        "requested_by": "alice",
        "submitted_at": now_iso(),
    }
    message.update(over)
    return message


class Events:
    """Every status event on the stream, in order; lets a test wait for one."""

    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []
        self._changed = asyncio.Condition()

    async def add(self, msg: Any) -> None:
        body = schemas.decode("job_event", msg.data)  # the scheduler publishes valid events
        async with self._changed:
            self.items.append(body)
            self._changed.notify_all()

    def of(self, build_id: int) -> list[dict[str, Any]]:
        return [e for e in self.items if e["build_id"] == build_id]

    async def wait(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 20.0
    ) -> dict[str, Any]:
        async with asyncio.timeout(timeout), self._changed:
            while True:
                for item in self.items:
                    if predicate(item):
                        return item
                await self._changed.wait()

    async def status(self, build_id: int, status: str, timeout: float = 20.0) -> dict[str, Any]:
        return await self.wait(
            lambda e: e["build_id"] == build_id and e["status"] == status, timeout
        )


@dataclass
class Harness:
    settings: Settings
    nc: Client
    js: JetStreamContext
    events: Events
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None

    @property
    def s(self) -> Any:
        return self.settings.subjects

    async def start(self) -> None:
        self.stop = asyncio.Event()
        self.task = asyncio.create_task(run(self.settings, None, self.stop))
        # Ready once it answers claims (an unknown build is refused, nothing changes).
        async with asyncio.timeout(20):
            while True:
                with contextlib.suppress(nats.errors.NoRespondersError, nats.errors.TimeoutError):
                    reply = await self.claim(10**9, "probe")
                    assert reply == {"granted": False, "reason": "unknown"}
                    return
                assert not self.task.done(), self.task
                await asyncio.sleep(0.05)

    async def halt(self) -> None:
        if self.task is not None:
            self.stop.set()
            await asyncio.wait_for(self.task, 15)
            self.task = None

    async def submit(self, data: bytes | dict[str, Any]) -> int:
        raw = data if isinstance(data, bytes) else codec.dumps(data)
        ack = await self.js.publish(self.s.submit, raw)
        return int(ack.seq)

    async def claim(self, build_id: int, runner_id: str, attempt: int = 1) -> dict[str, Any]:
        body = {"build_id": build_id, "runner_id": runner_id, "attempt": attempt}
        msg = await self.nc.request(self.s.claim, codec.dumps(body), timeout=2)
        return dict(schemas.decode("claim_reply", msg.data))

    async def cancel(self, build_id: int) -> dict[str, Any]:
        msg = await self.nc.request(
            self.s.control_cancel, codec.dumps({"build_id": build_id}), timeout=5
        )
        return dict(codec.loads(msg.data))

    async def report(self, build_id: int, runner_id: str, **result: Any) -> None:
        body = {"build_id": build_id, "runner_id": runner_id, "type": "finished", "at": now_iso()}
        body.update(result)
        await self.js.publish(self.s.report(runner_id), codec.dumps(schemas.check("report", body)))

    async def take_dispatch(self, arch: str = "amd64", kind: str = "script") -> Any:
        """Pull the next dispatch message the way a runner does, once the scheduler has
        made the consumer."""
        durable = self.s.dispatch_consumer(arch, kind)
        async with asyncio.timeout(10):
            while True:
                with contextlib.suppress(nats.js.errors.NotFoundError):
                    await self.js.consumer_info(self.s.dispatch_stream, durable)
                    break
                await asyncio.sleep(0.05)
        sub = await self.js.pull_subscribe_bind(durable, self.s.dispatch_stream)
        try:
            [msg] = await sub.fetch(1, timeout=10)
        finally:
            await sub.unsubscribe()
        schemas.decode("dispatch", msg.data)
        return msg

    async def dispatch_count(self) -> int:
        info = await self.js.stream_info(self.s.dispatch_stream)
        return int(info.state.messages)


class FakeRunner:
    """A runner's registry entry, kept alive by a heartbeat until stopped."""

    def __init__(self, h: Harness, runner_id: str, arch: str = "amd64") -> None:
        self.h, self.runner_id, self.arch = h, runner_id, arch
        self.task: asyncio.Task[None] | None = None

    async def put(self) -> None:
        value = {
            "runner_id": self.runner_id, "arch": self.arch, "kinds": ["script", "terraform"],
            "labels": {}, "version": "test", "hostname": "test", "state": "idle",
            "current_build_id": None, "started_at": now_iso(), "last_seen": now_iso(),
        }  # fmt: skip
        kv = await bus.ensure_kv(
            self.h.js, self.h.s.runners_bucket, ttl=3 * self.h.settings.heartbeat_s
        )
        await kv.put(self.runner_id, codec.dumps(schemas.check("runner_registration", value)))

    async def __aenter__(self) -> FakeRunner:
        await self.put()

        async def beat() -> None:
            while True:
                await asyncio.sleep(self.h.settings.heartbeat_s)
                await self.put()

        self.task = asyncio.create_task(beat())
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.die()

    def die(self) -> None:
        """Stop heartbeating: the key expires with the bucket's TTL."""
        if self.task is not None:
            self.task.cancel()


async def make_harness(settings: Settings) -> AsyncIterator[Harness]:
    nc = await nats.connect(settings.nats_url)
    js = nc.jetstream()
    await bus.ensure_streams(js, settings)
    events = Events()
    sub = await js.subscribe(
        settings.subjects.events_filter(), cb=events.add, ordered_consumer=True
    )
    h = Harness(settings, nc, js, events)
    try:
        await h.start()
        yield h
    finally:
        await h.halt()
        await sub.unsubscribe()
        await nc.close()


@pytest.fixture
async def h(settings: Settings) -> AsyncIterator[Harness]:
    async for harness in make_harness(settings):
        yield harness


@pytest.fixture
async def h_short(settings: Settings) -> AsyncIterator[Harness]:
    """Short queue timeout, for the no-runner rule."""
    async for harness in make_harness(replace(settings, queue_timeout_s=1.5)):
        yield harness


async def _is(value: Any, expected: object) -> bool:
    return bool(await value == expected)


# --- the tests ----------------------------------------------------------------------------
async def test_whole_life_events_in_order(h: Harness) -> None:
    async with FakeRunner(h, "runner-1"):
        build_id = await h.submit(submission())
        msg = await h.take_dispatch()
        work = codec.loads(msg.data)
        assert (work["build_id"], work["attempt"]) == (build_id, 1)
        assert work["variables"] == {"who": "world", "token": "s3cret"}

        assert await h.claim(build_id, "runner-1") == {"granted": True, "reason": None}
        # WORKING is on the stream before the runner hears "granted".
        assert [e["status"] for e in h.events.of(build_id)][-1:] == ["WORKING"] or (
            await h.events.status(build_id, "WORKING", timeout=2)
        )
        await msg.ack()
        assert (await h.claim(build_id, "runner-2"))["granted"] is False

        await h.report(build_id, "runner-1", exit_code=0)
        await h.events.status(build_id, "SUCCESS")

    items = h.events.of(build_id)
    assert [(e["status"], e["seq"], e["event_id"]) for e in items] == [
        ("IN-PROGRESS", 1, f"{build_id}-1"),
        ("WORKING", 2, f"{build_id}-2"),
        ("SUCCESS", 3, f"{build_id}-3"),
    ]
    first, working, done = items
    assert first["variables"] == {"who": "world", "token": "***"}
    assert working["runner_id"] == "runner-1" and working["started_at"]
    assert done["finished_at"] and done["exit_code"] == 0 and done["reason"] is None
    assert first["submitted_at"] == done["submitted_at"]
    assert await h.dispatch_count() == 0  # acked work leaves the work queue


async def test_failure_exit_code(h: Harness) -> None:
    async with FakeRunner(h, "runner-1"):
        build_id = await h.submit(submission(module_name="broken"))
        await (await h.take_dispatch()).ack()
        assert (await h.claim(build_id, "runner-1"))["granted"]
        await h.report(build_id, "runner-1", exit_code=3)
        final = await h.events.status(build_id, "FAILURE")
    assert (final["reason"], final["exit_code"], final["seq"]) == ("exit-code", 3, 3)


async def test_malformed_submission_rejected_next_processed(h: Harness) -> None:
    def rejected() -> float:
        value = REGISTRY.get_sample_value(
            "xoogify_rejected_messages_total",
            {"service": "scheduler", "subject": h.s.submit},
        )
        return value or 0.0

    before = rejected()
    await h.submit(b"{not json")
    bad_id = await h.submit(submission(module_name="Bad.Name"))
    good_id = await h.submit(submission())
    event = await h.events.status(good_id, "IN-PROGRESS")
    assert event["seq"] == 1
    assert h.events.of(bad_id) == []
    assert rejected() == before + 2

    # Terminated, not left pending for redelivery.
    async def settled() -> bool:
        info = await h.js.consumer_info(h.s.submit_stream, "scheduler-submit")
        return info.num_ack_pending == 0 and info.num_pending == 0

    await eventually(settled, timeout=10)
    assert (await h.cancel(10**6))["error"] == "unknown"


async def test_cancel_queued_and_running(h: Harness) -> None:
    async with FakeRunner(h, "runner-1"):
        first = await h.submit(submission(action="APPLY-AUTO"))
        second = await h.submit(submission(action="APPLY-AUTO"))
        queued = await h.events.status(second, "IN-PROGRESS")
        assert queued["queue_position"] == 1

        reply = await h.cancel(second)
        assert reply["ok"] and reply["error"] is None
        assert (reply["job"]["status"], reply["job"]["reason"]) == ("FAILURE", "cancelled")
        assert (await h.events.status(second, "FAILURE"))["reason"] == "cancelled"
        assert (await h.cancel(second)) == {"ok": False, "job": None, "error": "final"}

        msg = await h.take_dispatch()
        assert codec.loads(msg.data)["build_id"] == first  # the cancelled one never was
        assert (await h.claim(first, "runner-1"))["granted"]
        await msg.ack()
        stops: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

        async def on_stop(m: Any) -> None:
            stops.put_nowait(codec.loads(m.data))

        sub = await h.nc.subscribe(h.s.cancel(first), cb=on_stop)
        reply = await h.cancel(first)
        assert reply["ok"] and reply["job"]["status"] == "WORKING"
        stop = await asyncio.wait_for(stops.get(), 5)
        assert schemas.check("cancel_request", stop) == {
            "build_id": first, "reason": "cancelled", "requested_by": None,
        }  # fmt: skip
        await sub.unsubscribe()
        await h.report(first, "runner-1", reason="cancelled")
        final = await h.events.status(first, "FAILURE")
    assert final["reason"] == "cancelled"
    assert [e["seq"] for e in h.events.of(first)] == [1, 2, 3]


async def test_workspace_queue_over_nats(h: Harness) -> None:
    async with FakeRunner(h, "runner-1"):
        first = await h.submit(submission(action="APPLY-AUTO"))
        second = await h.submit(submission(action="DESTROY"))
        plan = await h.submit(submission(action="PLAN"))
        await h.events.status(plan, "IN-PROGRESS")
        assert (await h.events.status(second, "IN-PROGRESS"))["queue_position"] == 1
        # The first apply and the plan are dispatched; the destroy waits.
        await eventually(lambda: _is(h.dispatch_count(), 2), timeout=10)

        taken = {}
        for _ in range(2):
            msg = await h.take_dispatch()
            taken[codec.loads(msg.data)["build_id"]] = msg
        assert set(taken) == {first, plan}
        assert (await h.claim(first, "runner-1"))["granted"]
        await taken[first].ack()
        await h.report(first, "runner-1", exit_code=0)
        moved = await h.events.wait(lambda e: e["build_id"] == second and e["seq"] == 2, timeout=10)
        assert (moved["status"], moved["queue_position"]) == ("IN-PROGRESS", None)
        msg = await h.take_dispatch()
        assert codec.loads(msg.data)["build_id"] == second


async def test_no_runner_fails_after_queue_timeout(h_short: Harness) -> None:
    build_id = await h_short.submit(submission(module_type="arm64/script"))
    final = await h_short.events.status(build_id, "FAILURE", timeout=10)
    assert final["reason"] == "no-runner" and final["seq"] == 2
    # The message it left is gone or refused.
    await eventually(lambda: _is(h_short.dispatch_count(), 0), timeout=10)
    assert (await h_short.claim(build_id, "late"))["reason"] == "final"

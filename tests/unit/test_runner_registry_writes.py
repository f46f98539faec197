"""The registry's busy/idle writes: spaced, the latest state winning, so a runner doing
many short jobs does not put its key twice per job."""

from __future__ import annotations

import asyncio
from typing import Any

from services.common import codec
from services.runner.registry import Registry


class Bucket:
    """What Registry needs of a KV bucket; remembers every value put."""

    def __init__(self) -> None:
        self.values: list[dict[str, Any]] = []
        self.fail = False

    async def put(self, key: str, value: bytes) -> int:
        if self.fail:
            raise TimeoutError("NATS away")
        self.values.append(codec.loads(value))
        return len(self.values)

    async def delete(self, key: str) -> None:
        self.values.append({"deleted": key})


async def _turns(n: int = 5) -> None:
    """Let the event loop run other tasks (the background writer) a few times."""
    for _ in range(n):
        await asyncio.sleep(0)


async def test_many_short_jobs_are_a_few_writes_ending_with_the_latest_state() -> None:
    bucket = Bucket()
    registry = Registry(bucket, "runner-t", "amd64", ["script"], {}, 5.0)
    await registry.put()  # registration
    for build_id in range(1, 51):
        registry.announce("busy", build_id)
        await _turns()
        registry.announce("idle", None)
        await _turns()
    await registry.settle()
    states = [(v["state"], v["current_build_id"]) for v in bucket.values]
    # Registration, then (the spacing not yet over for any of these jobs) one write with
    # the latest state: 100 changes did not become 100 puts.
    assert len(states) <= 3
    assert states[-1] == ("idle", None)


async def test_a_change_is_written_even_after_the_spacing() -> None:
    bucket = Bucket()
    registry = Registry(bucket, "runner-t", "amd64", ["script"], {}, 5.0)
    await registry.put()
    registry.announce("busy", 7)
    await registry.settle()
    assert (bucket.values[-1]["state"], bucket.values[-1]["current_build_id"]) == ("busy", 7)
    registry.announce("idle", None)
    registry.announce("busy", 8)
    await registry.settle()
    assert (bucket.values[-1]["state"], bucket.values[-1]["current_build_id"]) == ("busy", 8)
    assert len(bucket.values) == 3  # registration, busy 7, busy 8: `idle` in between never


async def test_back_to_the_written_state_writes_nothing() -> None:
    bucket = Bucket()
    registry = Registry(bucket, "runner-t", "amd64", ["script"], {}, 5.0)
    await registry.put()
    registry.announce("busy", 7)
    registry.announce("idle", None)
    await registry.settle()
    assert len(bucket.values) == 1


async def test_a_failed_write_is_left_to_the_heartbeat() -> None:
    bucket = Bucket()
    registry = Registry(bucket, "runner-t", "amd64", ["script"], {}, 5.0)
    bucket.fail = True
    registry.announce("busy", 7)
    await registry.settle()  # returns: no retry loop while NATS is away
    assert bucket.values == []
    bucket.fail = False
    await registry.put()  # the heartbeat
    assert bucket.values[-1]["state"] == "busy"


async def test_remove_drops_a_pending_write_and_deletes_last() -> None:
    bucket = Bucket()
    registry = Registry(bucket, "runner-t", "amd64", ["script"], {}, 5.0)
    await registry.put()
    registry.announce("busy", 7)  # waits for the spacing after the registration
    await registry.remove()
    assert bucket.values[-1] == {"deleted": "runner-t"}
    assert all(v.get("state") != "busy" for v in bucket.values)

"""`bus.until_done`, the start-up retry: it retries what NATS answers while it starts or
elects, gives up only when told to stop, and lets a bug through."""

from __future__ import annotations

import asyncio

import pytest
from nats.errors import NoServersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.errors import ServiceUnavailableError

from services.common import bus


async def test_retries_nats_errors_until_it_succeeds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(asyncio, "sleep", _no_wait)
    failures = [NoServersError(), NatsTimeoutError(), ServiceUnavailableError(), TimeoutError()]
    calls = 0

    async def attempt() -> str:
        nonlocal calls
        calls += 1
        if failures:
            raise failures.pop(0)
        return "done"

    assert await bus.until_done("test", attempt) == "done"
    assert calls == 5


async def test_returns_none_once_stop_is_set() -> None:
    stop = asyncio.Event()
    calls = 0

    async def attempt() -> str:
        nonlocal calls
        calls += 1
        stop.set()  # stopped while this attempt was failing
        raise NoServersError()

    assert await asyncio.wait_for(bus.until_done("test", attempt, stop), 5) is None
    assert calls == 1


async def test_stop_cancels_an_attempt_that_hangs() -> None:
    stop = asyncio.Event()
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def attempt() -> str:
        started.set()
        try:
            await asyncio.Event().wait()  # like nats.connect with no server up
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return "never"

    waiting = asyncio.create_task(bus.until_done("test", attempt, stop))
    await asyncio.wait_for(started.wait(), 5)
    stop.set()
    assert await asyncio.wait_for(waiting, 5) is None
    assert cancelled.is_set()


async def test_other_errors_are_not_retried() -> None:
    async def attempt() -> str:
        raise ValueError("a bug, not NATS starting")

    with pytest.raises(ValueError, match="a bug"):
        await bus.until_done("test", attempt)


_real_sleep = asyncio.sleep


async def _no_wait(delay: float) -> None:
    await _real_sleep(0)

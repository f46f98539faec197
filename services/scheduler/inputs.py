"""The scheduler's inputs (submissions, reports) from their durable pull consumers, with one
pull request always open on the server, so an input is delivered the moment it is stored.

nats-py's `fetch` sends a new pull request per batch (inputs stored while a batch is
handled wait for it) and awaits each message with its own task and timeout. The gateway's
`Puller` (services/common/pull.py) sends a no_wait probe and then a long poll on every
call that finds nothing in hand, so its requests pile up on the server (each delivery ends
a call while its request stays open) and each one's expiry starts another pair: far more
requests than inputs at the scheduler's pace. Here a new request is sent only when the
last one is over: it expired, the server ended it (a status), its batch was delivered, or
it was heard of for longer than it could live (lost in a reconnect).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

from nats.aio.client import Client
from nats.aio.msg import Msg

from services.common import codec

_STATUS = "Status"
_HEARTBEAT = "100"
# Over, as expected: no messages (no_wait), expired, or a limit reached (409 also says
# "consumer deleted", which is not).
_REQUEST_OVER = {"404", "408", "409"}
# A request not heard of this long after its expiry is taken as lost.
LOST_AFTER_S = 0.5


class ConsumerGone(Exception):
    """The server answered with an error that needs the consumer made again."""


class Inputs:
    """Batches of deliveries from one existing durable pull consumer."""

    def __init__(
        self,
        nc: Client,
        stream: str,
        consumer: str,
        batch: int,
        expires_s: float,
        api_prefix: str = "$JS.API",
    ) -> None:
        self._nc = nc
        self._next = f"{api_prefix}.CONSUMER.MSG.NEXT.{stream}.{consumer}"
        self._inbox = nc.new_inbox()
        self._batch = batch
        self._expires_s = expires_s
        self._sub: Any = None
        self._msgs: list[Msg] = []
        self._arrived = asyncio.Event()
        # Deliveries the open request may still bring (0: none open) and when it was sent.
        self._left = 0
        self._asked_at = 0.0
        self._error: str | None = None

    async def start(self) -> None:
        self._sub = await self._nc.subscribe(self._inbox, cb=self._on_msg)

    async def stop(self) -> None:
        sub, self._sub = self._sub, None
        if sub is not None:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def _on_msg(self, msg: Msg) -> None:
        status = msg.headers.get(_STATUS) if msg.headers else None
        if status is None:
            self._msgs.append(msg)
            self._left -= 1
        elif status == _HEARTBEAT:
            return
        else:
            description = (msg.headers or {}).get("Description", "")
            if status not in _REQUEST_OVER or "deleted" in description.lower():
                self._error = f"{status} {description}"
            self._left = 0
        self._arrived.set()

    async def _ask(self) -> None:
        expires = max(int(self._expires_s * 1e9), 10_000_000)
        body = {"batch": self._batch, "expires": expires}
        self._left = self._batch
        self._asked_at = time.monotonic()
        await self._nc.publish(self._next, codec.dumps(body), reply=self._inbox)

    def _check(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise ConsumerGone(error)

    async def _ensure_asked(self) -> None:
        lost = time.monotonic() - self._asked_at > self._expires_s + LOST_AFTER_S
        if self._left <= 0 or lost:
            await self._ask()

    async def fetch(self, timeout: float) -> list[Msg]:
        """Up to `batch` deliveries: those in hand, else the first to arrive within
        `timeout` (an empty list when none did, or when the open request ended)."""
        self._check()
        if not self._msgs:
            self._arrived.clear()
            await self._ensure_asked()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), timeout)
            self._check()
        # The next request goes out now, so what comes meanwhile is the next batch.
        await self._ensure_asked()
        msgs, self._msgs = self._msgs[: self._batch], self._msgs[self._batch :]
        return msgs

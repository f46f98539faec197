"""Reading a durable JetStream pull consumer in batches, cheaply.

nats-py's `fetch` awaits every message of a batch with its own task and timeout
(`next_msg` → `create_task` + `wait_for`), which was the largest single cost of ingestion.
Here one core subscription on an inbox collects the deliveries in a callback, and a fetch
is one pull request (`$JS.API.CONSUMER.MSG.NEXT…`) and one wait. Deliveries that arrive
after a fetch returned (a pull request still open on the server) are kept for the next one,
so nothing the server handed over is dropped here.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from nats.aio.client import Client
from nats.aio.msg import Msg

from services.common import codec

_STATUS = "Status"
_HEARTBEAT = "100"
# Ends a pull request: no messages (no_wait), request expired, or a limit reached.
_REQUEST_OVER = {"404", "408", "409"}
# No answer at all to this many no_wait pulls in a row: subscribe again.
UNANSWERED_LIMIT = 5


class ConsumerGone(Exception):
    """The server answered a pull with an error that needs the consumer recreated."""


def stream_seq(msg: Msg) -> int:
    """The stream sequence from a JetStream reply subject, without building nats-py's
    Metadata (a datetime and two dataclasses per message).

    v1: $JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>
    v2: $JS.ACK.<domain>.<account>.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>[.…]
    """
    tokens = (msg.reply or "").split(".")
    if len(tokens) == 9:
        return int(tokens[5])
    if len(tokens) >= 11:
        return int(tokens[7])
    return msg.metadata.sequence.stream  # raises NotJSMessageError for a non-JS message


class Puller:
    """Batches from one existing durable pull consumer."""

    def __init__(self, nc: Client, stream: str, consumer: str, api_prefix: str = "$JS.API") -> None:
        self._nc = nc
        self._next = f"{api_prefix}.CONSUMER.MSG.NEXT.{stream}.{consumer}"
        self._inbox = nc.new_inbox()
        self._sub: Any = None
        self._msgs: list[Msg] = []
        self._want = 0
        self._ready = asyncio.Event()
        self._error: str | None = None
        self._unanswered = 0

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
            if len(self._msgs) >= self._want:
                self._ready.set()
        elif status == _HEARTBEAT:
            return
        elif status in _REQUEST_OVER:
            description = (msg.headers or {}).get("Description", "")
            if status == "409" and "deleted" in description.lower():
                self._error = f"{status} {description}"
            self._ready.set()
        else:
            self._error = f"{status} {(msg.headers or {}).get('Description', '')}"
            self._ready.set()

    async def _request(self, body: dict[str, Any], want: int, timeout: float) -> None:
        """Send one pull request; wait until `want` messages are in hand, the request is
        over, or `timeout`."""
        self._ready.clear()
        self._want = want
        await self._nc.publish(self._next, codec.dumps(body), reply=self._inbox)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._ready.wait(), timeout)
        self._check()

    def _take(self, batch: int) -> list[Msg]:
        msgs, self._msgs = self._msgs[:batch], self._msgs[batch:]
        return msgs

    def _check(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise ConsumerGone(error)

    async def fetch(self, batch: int, timeout: float) -> list[Msg]:
        """Up to `batch` messages: what is available at once, else the first ones to
        arrive within `timeout` (an empty list when none did)."""
        self._check()
        if not self._msgs:
            # What the stream holds now, answered at once (then "no messages").
            await self._request({"batch": batch, "no_wait": True}, batch, timeout)
            if self._msgs or self._ready.is_set():
                self._unanswered = 0
            else:
                # The server always answers a no_wait pull: silence, again and again, means
                # our inbox or the connection is gone (once may be a busy machine).
                self._unanswered += 1
                if self._unanswered >= UNANSWERED_LIMIT:
                    self._unanswered = 0
                    raise ConsumerGone("no answer to pull requests")
        if not self._msgs:
            # Nothing waiting: a long poll, back as soon as something arrives. It expires
            # on the server a little before we stop waiting here.
            expires = max(int((timeout - 0.05) * 1e9), 10_000_000)
            await self._request({"batch": batch, "expires": expires}, 1, timeout)
            # A burst is usually on its way behind the first message: let it land.
            await asyncio.sleep(0)
        return self._take(batch)

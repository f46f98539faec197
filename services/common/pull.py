"""Reading a durable JetStream pull consumer in batches, cheaply.

nats-py's `fetch` awaits every message of a batch with its own task and timeout
(`next_msg` → `create_task` + `wait_for`), which was the largest single cost of ingestion.
Here one core subscription on an inbox collects the deliveries, and a fetch is one pull
request (`$JS.API.CONSUMER.MSG.NEXT…`) and one wait. Deliveries that arrive after a fetch
returned (a pull request still open on the server) are kept for the next one, so nothing
the server handed over is dropped here.

The deliveries are taken from nats-py as raw bytes where it allows (`raw_route`): its `Msg`
(headers parsed into a dict, a dataclass, a queue and a task hop per message) was a fifth
of the gateway's CPU during ingestion, and ingestion needs only subject, reply and data.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple

from nats.aio.client import Client
from nats.aio.msg import Msg

from services.common import codec

log = logging.getLogger(__name__)

_STATUS = "Status"
_HEARTBEAT = "100"
# Ends a pull request: no messages (no_wait), request expired, or a limit reached.
_REQUEST_OVER = {"404", "408", "409"}
# No answer at all to this many no_wait pulls in a row: subscribe again.
UNANSWERED_LIMIT = 5
# JetStream acknowledgements (the payload published to a delivery's reply subject).
ACK, TERM, IN_PROGRESS = b"", b"+TERM", b"+WPI"


class ConsumerGone(Exception):
    """The server answered a pull with an error that needs the consumer recreated."""


class Delivery(NamedTuple):
    """One message from the consumer: all ingestion needs of it."""

    subject: str
    reply: str
    data: bytes


def reply_stream_seq(reply: str) -> int:
    """The stream sequence from a JetStream reply subject, without building nats-py's
    Metadata (a datetime and two dataclasses per message).

    v1: $JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>
    v2: $JS.ACK.<domain>.<account>.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>[.…]
    """
    tokens = reply.split(".")
    if len(tokens) == 9:
        return int(tokens[5])
    if len(tokens) >= 11:
        return int(tokens[7])
    raise ValueError(f"not a JetStream reply subject: {reply!r}")


def stream_seq(msg: Msg) -> int:
    """The stream sequence of a JetStream message (see `reply_stream_seq`)."""
    try:
        return reply_stream_seq(msg.reply or "")
    except ValueError:
        return msg.metadata.sequence.stream  # raises NotJSMessageError for a non-JS message


# What nats-py's parser hands `Client._process_msg` for every MSG/HMSG it reads.
RawHandler = Callable[[bytes, bytes, bytes, "bytes | None"], None]
_PROCESS_MSG_PARAMS = ["sid", "subject", "reply", "data", "headers"]


def _raw_routing_supported() -> bool:
    method = getattr(Client, "_process_msg", None)
    if method is None or not inspect.iscoroutinefunction(method):
        return False
    params = list(inspect.signature(method).parameters)[1:]
    return params == _PROCESS_MSG_PARAMS


RAW_ROUTING = _raw_routing_supported()


class _Router:
    """Sits in front of one client's `_process_msg`: deliveries to a routed subscription
    go to its handler as bytes, everything else to nats-py as before."""

    def __init__(self, nc: Client) -> None:
        self.routes: dict[int, RawHandler] = {}
        self._original: Callable[..., Awaitable[None]] = nc._process_msg
        self._nc = nc

    async def process_msg(
        self, sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes | None
    ) -> None:
        handler = self.routes.get(sid)
        if handler is None:
            await self._original(sid, subject, reply, data, headers)
            return
        self._nc.stats["in_msgs"] += 1
        self._nc.stats["in_bytes"] += len(data)
        handler(subject, reply, data, headers)


def raw_route(nc: Client, sid: int, handler: RawHandler) -> Callable[[], None] | None:
    """Hand the deliveries of subscription `sid` to `handler` as raw bytes (subject,
    reply, data, header block or None), before nats-py builds a `Msg` of them. Returns the
    function that removes the route, or None when this nats-py's internals are not the
    ones this was written against (then the subscription's callback gets `Msg`s as usual).
    """
    if not RAW_ROUTING:
        return None
    router = getattr(nc, "_xoogify_router", None)
    if router is None:
        router = _Router(nc)
        nc._xoogify_router = router  # type: ignore[attr-defined]
        # The parser looks `_process_msg` up on the client for every message.
        nc._process_msg = router.process_msg  # type: ignore[method-assign]
    router.routes[sid] = handler

    def unroute() -> None:
        router.routes.pop(sid, None)

    return unroute


def status_of(headers: bytes | None) -> tuple[str, str] | None:
    """(status, description) of a server status message (`NATS/1.0 404 No Messages`), or
    None for a message (its header block, if any, has nothing after `NATS/1.0` on its
    first line)."""
    if not headers or headers[8:9] != b" ":
        return None
    line = headers[9:].split(b"\r\n", 1)[0].decode(errors="replace")
    status, _, description = line.partition(" ")
    return status, description.strip()


class Puller:
    """Batches from one existing durable pull consumer."""

    def __init__(self, nc: Client, stream: str, consumer: str, api_prefix: str = "$JS.API") -> None:
        self._nc = nc
        self._next = f"{api_prefix}.CONSUMER.MSG.NEXT.{stream}.{consumer}"
        self._inbox = nc.new_inbox()
        self._sub: Any = None
        self._unroute: Callable[[], None] | None = None
        self._msgs: list[Delivery] = []
        self._want = 0
        self._ready = asyncio.Event()
        self._error: str | None = None
        self._unanswered = 0

    @property
    def raw(self) -> bool:
        """Whether deliveries come as raw bytes (else through nats-py's `Msg`)."""
        return self._unroute is not None

    async def start(self, raw: bool = True) -> None:
        self._sub = await self._nc.subscribe(self._inbox, cb=self._on_msg)
        if raw:
            self._unroute = raw_route(self._nc, self._sub._id, self._on_raw)

    async def stop(self) -> None:
        sub, self._sub = self._sub, None
        unroute, self._unroute = self._unroute, None
        if unroute is not None:
            unroute()
        if sub is not None:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    def _on_raw(self, subject: bytes, reply: bytes, data: bytes, headers: bytes | None) -> None:
        status = status_of(headers)
        if status is None:
            self._deliver(Delivery(subject.decode(), reply.decode(), data))
        else:
            self._on_status(*status)

    async def _on_msg(self, msg: Msg) -> None:
        status = msg.headers.get(_STATUS) if msg.headers else None
        if status is None:
            self._deliver(Delivery(msg.subject, msg.reply, msg.data))
        else:
            self._on_status(status, (msg.headers or {}).get("Description", ""))

    def _deliver(self, delivery: Delivery) -> None:
        self._msgs.append(delivery)
        if len(self._msgs) >= self._want:
            self._ready.set()

    def _on_status(self, status: str, description: str) -> None:
        if status == _HEARTBEAT:
            return
        if status in _REQUEST_OVER:
            if status == "409" and "deleted" in description.lower():
                self._error = f"{status} {description}"
        else:
            self._error = f"{status} {description}"
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

    def _take(self, batch: int) -> list[Delivery]:
        msgs, self._msgs = self._msgs[:batch], self._msgs[batch:]
        return msgs

    def _check(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise ConsumerGone(error)

    async def fetch(self, batch: int, timeout: float) -> list[Delivery]:
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

    async def reply(self, delivery: Delivery, payload: bytes) -> None:
        """Acknowledge one delivery (`ACK`, `TERM` or `IN_PROGRESS`)."""
        await self._nc.publish(delivery.reply, payload)

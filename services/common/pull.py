"""Reading durable JetStream pull consumers, cheaply: one reader (`PullReader`) for the
gateway's ingestion, the scheduler's inputs and the runners' dispatch.

nats-py's `fetch` awaits every message of a batch with its own task and timeout
(`next_msg` → `create_task` + `wait_for`), which was the largest single cost of ingestion,
and sends a new pull request per call. Here one core subscription on an inbox collects the
deliveries of one pull request kept open at a time (`$JS.API.CONSUMER.MSG.NEXT…`).
Deliveries that arrive while the caller is busy are kept for its next call, so nothing the
server handed over is dropped here.

The deliveries are taken from nats-py as raw bytes where it allows (`raw_route`): its `Msg`
(headers parsed into a dict, a dataclass, a queue and a task hop per message) was a fifth
of the gateway's CPU during ingestion, and readers need only subject, reply and data.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from nats.aio.client import Client
from nats.aio.msg import Msg

from services.common import codec

log = logging.getLogger(__name__)

_STATUS = "Status"
_HEARTBEAT = "100"
# Ends a pull request: no messages (no_wait), request expired, or a limit reached.
_REQUEST_OVER = {"404", "408", "409"}
# This many requests in a row never heard of: the consumer or the inbox is gone.
UNANSWERED_LIMIT = 3
# JetStream acknowledgements (the payload published to a delivery's reply subject).
ACK, NAK, TERM, IN_PROGRESS = b"", b"-NAK", b"+TERM", b"+WPI"
# A request not heard of this long after its expiry is taken as lost.
LOST_AFTER_S = 0.5


class ConsumerGone(Exception):
    """The server answered a pull with an error that needs the consumer recreated."""


def ack_sequences(reply: bytes | str) -> tuple[int, int]:
    """(stream sequence, consumer sequence) from a JetStream delivery's reply subject,
    without building nats-py's Metadata (a datetime and two dataclasses per message).

    v1: $JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>
    v2: $JS.ACK.<domain>.<account>.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>[.…]
    """
    tokens = reply.split(b".") if isinstance(reply, bytes) else reply.split(".")
    if len(tokens) == 9:
        return int(tokens[5]), int(tokens[6])
    if len(tokens) >= 11:
        return int(tokens[7]), int(tokens[8])
    raise ValueError(f"not a JetStream reply subject: {reply!r}")


def reply_stream_seq(reply: str) -> int:
    """The stream sequence from a JetStream reply subject (`ack_sequences`)."""
    return ack_sequences(reply)[0]


def stream_seq(msg: Any) -> int:
    """The stream sequence of a JetStream message, nats-py's `Msg` or a `Delivery` (see
    `reply_stream_seq`)."""
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


class RawSubscription:
    """A core subscription whose deliveries go to a raw handler (`raw_route`) where this
    nats-py allows it, else to its `Msg` callback. `unsubscribe` ends both, as nats-py's
    `Subscription.unsubscribe` does."""

    def __init__(self, sub: Any, unroute: Callable[[], None] | None) -> None:
        self._sub = sub
        self._unroute = unroute

    @property
    def raw(self) -> bool:
        return self._unroute is not None

    def unroute(self) -> None:
        """Stop handing deliveries to the raw handler (nats-py gets them from now on)."""
        unroute, self._unroute = self._unroute, None
        if unroute is not None:
            unroute()

    async def unsubscribe(self) -> None:
        self.unroute()
        with contextlib.suppress(Exception):
            await self._sub.unsubscribe()


async def subscribe_raw(
    nc: Client,
    subject: str,
    on_raw: RawHandler,
    on_msg: Callable[[Msg], Awaitable[None]] | None = None,
    raw: bool = True,
) -> RawSubscription:
    """Subscribe `subject`, its deliveries to `on_raw` as bytes (with `raw`, where this
    nats-py allows it), else to `on_msg`."""
    sub = await nc.subscribe(subject, cb=on_msg)
    return RawSubscription(sub, raw_route(nc, sub._id, on_raw) if raw else None)


def header_value(headers: bytes, name: bytes) -> bytes | None:
    """One header's value (`name` with its colon) from a raw NATS header block, or None."""
    start = headers.find(name)
    if start < 0:
        return None
    end = headers.find(b"\r\n", start)
    return headers[start + len(name) : end if end >= 0 else None].strip()


def status_of(headers: bytes | None) -> tuple[str, str] | None:
    """(status, description) of a server status message (`NATS/1.0 404 No Messages`), or
    None for a message (its header block, if any, has nothing after `NATS/1.0` on its
    first line)."""
    if not headers or headers[8:9] != b" ":
        return None
    line = headers[9:].split(b"\r\n", 1)[0].decode(errors="replace")
    status, _, description = line.partition(" ")
    return status, description.strip()


class Delivery:
    """One message from a pull consumer: what its readers need of it (subject, reply,
    data), and its acknowledgements, as nats-py's `Msg` has them. Final replies (ack, nak,
    term) after the first are ignored: the server would ignore them too."""

    __slots__ = ("_done", "_nc", "data", "reply", "subject")

    def __init__(self, subject: str, reply: str, data: bytes, nc: Client | None = None) -> None:
        self.subject = subject
        self.reply = reply
        self.data = data
        self._nc = nc
        self._done = False

    def __repr__(self) -> str:
        return f"Delivery({self.subject!r}, {self.reply!r}, {len(self.data)} bytes)"

    @property
    def stream_seq(self) -> int:
        return reply_stream_seq(self.reply)

    async def _send(self, payload: bytes, final: bool = True) -> None:
        if self._done:
            return
        if self._nc is None:
            raise RuntimeError("a Delivery made without a connection cannot be acknowledged")
        self._done = final
        await self._nc.publish(self.reply, payload)

    async def ack(self) -> None:
        await self._send(ACK)

    async def nak(self, delay: float | None = None) -> None:
        """Back to the consumer now (another reader may take it), or after `delay` s."""
        payload = NAK if not delay else NAK + b' {"delay":%d}' % int(delay * 1e9)
        await self._send(payload)

    async def term(self) -> None:
        await self._send(TERM)

    async def in_progress(self) -> None:
        await self._send(IN_PROGRESS, final=False)


class PullReader:
    """Deliveries from one existing durable pull consumer, with at most one pull request
    open on the server at a time.

    nats-py's `fetch` sends a new pull request per batch (messages stored while a batch is
    handled wait for the next call) and awaits each message with its own task and
    timeout. Sending a no_wait probe and a long poll on every call, as ingestion once did,
    piles requests up on the server at a slow pace (each delivery ends a call while its
    request stays open) and each expiry starts another pair. Here a new request goes out
    only when the last one is over: its batch was delivered, the server ended it (a
    status: expired, no messages, a limit), or nothing was heard of it for longer than it
    could live (lost in a reconnect). So a message is delivered the moment it is stored,
    and there are never more requests than deliveries need.

    Deliveries are taken from nats-py as raw bytes where it allows (`raw_route`).
    `on_arrival`, if given, is called (synchronously) after each delivery or end of a
    request, for a caller that waits on several readers at once.
    """

    def __init__(
        self,
        nc: Client,
        stream: str,
        consumer: str,
        *,
        batch: int,
        expires_s: float,
        api_prefix: str = "$JS.API",
        on_arrival: Callable[[], None] | None = None,
    ) -> None:
        self._nc = nc
        self._next = f"{api_prefix}.CONSUMER.MSG.NEXT.{stream}.{consumer}"
        self._inbox = nc.new_inbox()
        self.batch = batch
        self._expires_s = expires_s
        self._on_arrival = on_arrival
        self._sub: RawSubscription | None = None
        self._msgs: list[Delivery] = []
        self._arrived = asyncio.Event()
        # Deliveries the open request may still bring (0: none open), when it was sent,
        # and how many requests in a row were never heard of.
        self._left = 0
        self._asked_at = 0.0
        self._heard = True
        self._lost = 0
        self._error: str | None = None

    @property
    def raw(self) -> bool:
        """Whether deliveries come as raw bytes (else through nats-py's `Msg`)."""
        return self._sub is not None and self._sub.raw

    @property
    def in_hand(self) -> int:
        return len(self._msgs)

    @property
    def asking(self) -> bool:
        """Whether a request is open (as far as this reader knows)."""
        return self._left > 0 and not self._expired()

    async def start(self, raw: bool = True) -> None:
        self._sub = await subscribe_raw(self._nc, self._inbox, self._on_raw, self._on_msg, raw)

    async def stop(self) -> None:
        sub, self._sub = self._sub, None
        if sub is not None:
            await sub.unsubscribe()

    def _on_raw(self, subject: bytes, reply: bytes, data: bytes, headers: bytes | None) -> None:
        status = status_of(headers)
        if status is None:
            self._deliver(Delivery(subject.decode(), reply.decode(), data, self._nc))
        else:
            self._on_status(*status)

    async def _on_msg(self, msg: Msg) -> None:
        status = msg.headers.get(_STATUS) if msg.headers else None
        if status is None:
            self._deliver(Delivery(msg.subject, msg.reply, msg.data, self._nc))
        else:
            self._on_status(status, (msg.headers or {}).get("Description", ""))

    def _deliver(self, delivery: Delivery) -> None:
        self._msgs.append(delivery)
        self._left -= 1
        self._heard = True
        self._arrived.set()
        if self._on_arrival is not None:
            self._on_arrival()

    def _on_status(self, status: str, description: str) -> None:
        if status == _HEARTBEAT:
            return
        if status not in _REQUEST_OVER or "deleted" in description.lower():
            self._error = f"{status} {description}"
        self._left = 0
        self._heard = True
        self._arrived.set()
        if self._on_arrival is not None:
            self._on_arrival()

    def _expired(self) -> bool:
        return time.monotonic() - self._asked_at > self._expires_s + LOST_AFTER_S

    def _check(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise ConsumerGone(error)

    async def ask(self) -> None:
        """Open a request unless one is open. A request never heard of (no delivery, no
        status) `UNANSWERED_LIMIT` times in a row means the consumer or the inbox is gone
        (the server answers every request, at least with its expiry)."""
        self._check()
        if self.asking:
            return
        if self._left > 0 and not self._heard:
            self._lost += 1
            if self._lost >= UNANSWERED_LIMIT:
                self._lost = 0
                raise ConsumerGone("no answer to pull requests")
        elif self._heard:
            self._lost = 0
        expires = max(int(self._expires_s * 1e9), 10_000_000)
        self._left = self.batch
        self._heard = False
        self._asked_at = time.monotonic()
        await self._nc.publish(
            self._next, codec.dumps({"batch": self.batch, "expires": expires}), reply=self._inbox
        )

    def take(self, count: int | None = None) -> list[Delivery]:
        """Up to `count` (default: `batch`) of the deliveries in hand."""
        count = self.batch if count is None else count
        msgs, self._msgs = self._msgs[:count], self._msgs[count:]
        return msgs

    async def fetch(self, timeout: float, *, ask_again: bool = True) -> list[Delivery]:
        """Up to `batch` deliveries: those in hand, else the first to arrive within
        `timeout` (an empty list when none did, or when the open request ended). With
        `ask_again`, the next request goes out before returning, so what is stored while
        the caller handles this batch is delivered meanwhile."""
        self._check()
        if not self._msgs:
            self._arrived.clear()
            await self.ask()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), timeout)
            self._check()
            if self._msgs:
                # A burst is usually on its way behind the first message: let it land.
                await asyncio.sleep(0)
        if ask_again:
            await self.ask()
        return self.take()

    async def over(self, timeout: float) -> None:
        """Wait (at most `timeout`) until no request is open: for a reader that stops
        taking messages and must not leave any delivered to it unanswered."""
        deadline = time.monotonic() + timeout
        while self.asking and (left := deadline - time.monotonic()) > 0:
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), left)

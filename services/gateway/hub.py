"""The websocket fan-out hub: one ordered consumer on the events stream, live only, and a
bounded queue per socket (see `live_client.LiveClient`).

Each event is checked and encoded once, then offered to the sockets without awaiting, so
a slow socket never slows the hub or anyone else. Events are handed to the sockets in
flushes: at once while few sockets are connected, at most one flush per few milliseconds
per hundred sockets when many are (each flush wakes and sends to every socket it covers,
so with a thousand sockets one send per socket per event would be most of the gateway's
CPU). The sockets are spread over a few groups flushed in turn, evenly spaced: each socket
still gets one frame per flush interval, but no update waits for the sends to every other
socket first. A watchdog restarts the ordered consumer after the last event received when
it stops delivering (nats-py may not recreate it after a NATS restart).

The consumer is ordered as nats-py's `ordered_consumer` is (an ephemeral push consumer,
no acks, flow control; a gap in its consumer sequence starts a new one after the last
event taken), but its deliveries are read as raw bytes (`raw_route`): a nats-py `Msg` per
event (headers parsed, metadata, a queue and a task hop) was a sixth of the gateway's CPU
during ingestion. Where nats-py's internals differ, nats-py's own ordered consumer is used.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import Coroutine
from typing import Any

from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from prometheus_client import Counter, Gauge

from services.common.metrics import REJECTED
from services.common.pull import (
    RawSubscription,
    ack_sequences,
    header_value,
    status_of,
    stream_seq,
    subscribe_raw,
)
from services.common.schemas import SchemaError
from services.common.status import is_final
from services.gateway.context import GatewayContext
from services.gateway.live_client import Flush, Item, LiveClient, make_item

log = logging.getLogger(__name__)

RECENT_FINAL = 10_000
# Flushes to a socket are at least (sockets * FLUSH_PER_CLIENT_S) apart (100 ms for a
# thousand sockets), never more than FLUSH_MAX_S.
FLUSH_PER_CLIENT_S = 0.0001
FLUSH_MAX_S = 0.1
# The sockets are in this many groups, flushed one after another, 1/GROUPS of the
# interval apart: the sends of one flush are a tenth of them, so the last socket of a
# flush is served within milliseconds, not after a thousand sends.
GROUPS = 10
# Server status messages on a push consumer: heartbeats and flow-control requests.
_CONTROL = "100"
_LAST_CONSUMER = b"Nats-Last-Consumer:"
_STALLED = b"Nats-Consumer-Stalled:"

WS_CLIENTS = Gauge("xoogify_gateway_ws_clients", "Websockets connected to this gateway")
WS_RESYNCS = Counter("xoogify_gateway_ws_resyncs_total", "Websockets sent `resync`")
HUB_RESTARTS = Counter(
    "xoogify_gateway_hub_restarts_total", "Times the watchdog restarted the hub's consumer"
)


class _Group:
    """Sockets flushed together. `handed` counts the hub's events (an index into its
    stream of checked events) handed to them; `last_seq` is the last one's sequence."""

    __slots__ = ("clients", "flushed_at", "handed", "last_seq")

    def __init__(self, handed: int, last_seq: int) -> None:
        self.clients: set[LiveClient] = set()
        self.handed = handed
        self.last_seq = last_seq
        self.flushed_at = float("-inf")


class Hub:
    """Follows the events stream once and fans updates out to every websocket."""

    def __init__(
        self,
        ctx: GatewayContext,
        *,
        queue_limit: int = 1000,
        buffer_limit: int = 20_000,
        stall_timeout: float = 30.0,
        watchdog_interval: float = 1.0,
    ) -> None:
        self.ctx = ctx
        # The last event received from the stream (which may wait for a flush); what each
        # group was handed is its own (`watermark`).
        self.received_seq = 0
        # Checked events not yet handed to every group; _pending[0] is event number
        # _pending_start of the hub's life.
        self._pending: list[Item] = []
        self._pending_start = 0
        self._groups = [_Group(0, 0) for _ in range(GROUPS)]
        self._group_of: dict[LiveClient, _Group] = {}
        self._flush_at: asyncio.TimerHandle | None = None
        # When the armed flush is due, and when the last one was (its turn, not its run).
        self._flush_due: float | None = None
        self._last_flush = float("-inf")
        # Tunables read when a socket connects (tests lower them).
        self.queue_limit = queue_limit
        self.buffer_limit = buffer_limit
        self.stall_timeout = stall_timeout
        self.watchdog_interval = watchdog_interval
        self.clients: set[LiveClient] = set()
        self.rejected = 0
        self.restarts = 0
        # The raw consumer's subscription (or, where nats-py's internals differ, nats-py's
        # ordered consumer), and the consumer sequence expected next.
        self._sub: RawSubscription | Any = None
        self._next_cseq = 1
        # Restarts one at a time (the watchdog's and a gap's may meet); what the read loop
        # starts (flow-control answers, a restart), held until done.
        self._restarting = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()
        self._watchdog: asyncio.Task[None] | None = None
        self._final_waiters: dict[int, set[asyncio.Future[str]]] = {}
        # Jobs the hub saw end lately: a log follower reaching eof just after the final
        # event went by (and before Postgres has it) still learns the status at once.
        self._recent_final: OrderedDict[int, str] = OrderedDict()

    # --- lifecycle ---------------------------------------------------------------------
    async def start(self) -> None:
        info = await self.ctx.js.stream_info(self.ctx.settings.subjects.events_stream)
        # Live only: whatever is already in the stream is the snapshot's or a replay's job.
        self.received_seq = info.state.last_seq
        for group in self._groups:
            group.last_seq = self.received_seq
        try:
            await self._subscribe()
        except BaseException:
            await self._unsubscribe()  # start() is retried: leave nothing subscribed
            raise
        self._watchdog = asyncio.create_task(self._watch(), name="hub-watchdog")

    async def stop(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watchdog
        for task in list(self._tasks):
            task.cancel()
        await self._unsubscribe()
        if self._flush_at is not None:
            self._flush_at.cancel()
            self._flush_at = None
        for waiters in self._final_waiters.values():
            for fut in waiters:
                fut.cancel()
        self._final_waiters.clear()

    async def _subscribe(self) -> None:
        nc, subjects = self.ctx.nc, self.ctx.settings.subjects
        inbox = nc.new_inbox()
        sub = await subscribe_raw(nc, inbox, self._on_raw)
        if not sub.raw:
            await sub.unsubscribe()
            await self._subscribe_ordered()
            return
        self._sub, self._next_cseq = sub, 1
        # What nats-py's ordered consumer asks for. Like nats-py, a restart does not
        # delete the old consumer (a request that would wait out its timeout while NATS
        # is away): an ephemeral consumer goes away by itself a few seconds after its
        # inbox lost interest.
        config = ConsumerConfig(
            deliver_subject=inbox,
            filter_subject=subjects.events_filter(),
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=self.received_seq + 1,
            ack_policy=AckPolicy.NONE,
            max_deliver=1,
            flow_control=True,
            idle_heartbeat=2.0,
            mem_storage=True,
            num_replicas=1,
            inactive_threshold=5.0,
        )
        await self.ctx.js.add_consumer(subjects.events_stream, config)

    async def _subscribe_ordered(self) -> None:
        subjects = self.ctx.settings.subjects
        self._sub = await self.ctx.js.subscribe(
            subjects.events_filter(),
            stream=subjects.events_stream,
            cb=self._on_msg,
            ordered_consumer=True,
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
            config=ConsumerConfig(opt_start_seq=self.received_seq + 1),
            idle_heartbeat=2.0,
        )

    async def _unsubscribe(self) -> None:
        sub, self._sub = self._sub, None
        if sub is not None:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def _watch(self) -> None:
        """Restart the consumer when the stream holds events it has not delivered for a
        whole interval without progress."""
        stream = self.ctx.settings.subjects.events_stream
        behind_target: int | None = None
        seen = self.received_seq
        while True:
            await asyncio.sleep(self.watchdog_interval)
            if not self.ctx.nc.is_connected:
                continue
            try:
                info = await self.ctx.js.stream_info(stream)
            except Exception as exc:
                log.warning("hub watchdog: stream info failed", extra={"error": repr(exc)})
                continue
            stuck = (
                behind_target is not None
                and self.received_seq < behind_target
                and self.received_seq == seen
            )
            if stuck:
                await self.restart("no delivery while the stream is ahead")
            seen = self.received_seq
            last = info.state.last_seq
            behind_target = last if last > self.received_seq else None

    async def restart(self, why: str) -> None:
        extra = {"reason": why, "from_seq": self.received_seq + 1}
        log.warning("hub consumer restarted", extra=extra)
        self.restarts += 1
        HUB_RESTARTS.inc()
        async with self._restarting:
            await self._unsubscribe()
            try:
                await self._subscribe()
            except Exception as exc:
                # The next watchdog round tries again.
                log.warning("hub resubscribe failed", extra={"error": repr(exc)})

    # --- events ------------------------------------------------------------------------
    async def _on_msg(self, msg: Msg) -> None:
        self.dispatch(stream_seq(msg), msg.subject, msg.data)

    def _on_raw(self, subject: bytes, reply: bytes, data: bytes, headers: bytes | None) -> None:
        """A delivery of the raw consumer, in nats-py's read loop (never awaits)."""
        status = status_of(headers)
        if status is not None:
            if status[0] == _CONTROL and headers is not None:
                self._on_control(reply, headers)
            return
        try:
            sseq, cseq = ack_sequences(reply)
        except ValueError:
            return  # not from the consumer: nothing else publishes to its inbox
        if cseq != self._next_cseq:
            self._gap(f"consumer sequence {cseq}, expected {self._next_cseq}")
            return
        self._next_cseq = cseq + 1
        self.dispatch(sseq, subject.decode(), data)

    def _on_control(self, reply: bytes, headers: bytes) -> None:
        # A flow-control request (it has a reply subject) is answered at once: everything
        # delivered before it has been taken, as deliveries are handled as they are read.
        # A heartbeat names a stalled flow control's reply, and the last consumer sequence
        # sent: one we never got is a gap.
        answer = reply or header_value(headers, _STALLED)
        if answer:
            self._background(self.ctx.nc.publish(answer.decode()))
        last = header_value(headers, _LAST_CONSUMER)
        if last is not None and not reply and int(last) != self._next_cseq - 1:
            self._gap(f"heartbeat says consumer sequence {int(last)}")

    def _gap(self, why: str) -> None:
        # Drop the rest of this consumer's deliveries; a new one starts after the last
        # event taken (what it repeats, dispatch skips).
        if isinstance(self._sub, RawSubscription) and self._sub.raw:
            self._sub.unroute()
            self._background(self.restart(why))

    def _background(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @property
    def last_seq(self) -> int:
        """The last event handed to every socket."""
        return min(group.last_seq for group in self._groups)

    def watermark(self, client: LiveClient) -> int:
        """The last event handed to this socket's group: a `hello`'s watermark, a replay's
        switch point. Every later one reaches the socket by its group's flushes."""
        return self._group_of[client].last_seq

    def dispatch(self, stream_seq: int, subject: str, data: bytes) -> None:
        """Take one stream event for the sockets' next flushes. Never awaits."""
        if stream_seq <= self.received_seq:
            return  # already dispatched (a restarted consumer may overlap)
        self.received_seq = stream_seq
        try:
            item = make_item(stream_seq, data)
        except SchemaError as exc:
            self.rejected += 1
            REJECTED.labels("gateway", self.ctx.settings.subjects.events_filter()).inc()
            log.warning(
                "bad job event skipped",
                extra={"subject": subject, "stream_seq": stream_seq, "error": str(exc)},
            )
            if not self._pending:
                # Nothing waits before it: every socket is past it.
                for group in self._groups:
                    group.last_seq = stream_seq
            return
        self._note_final(item)
        self._pending.append(item)
        if self._flush_at is None:
            self._schedule()

    def _spacing(self) -> float:
        """How far apart two flushes of one group must be."""
        return min(FLUSH_MAX_S, len(self.clients) * FLUSH_PER_CLIENT_S)

    def _schedule(self) -> None:
        end = self._pending_start + len(self._pending)
        waiting = [g for g in self._groups if g.handed < end]
        if not waiting:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        spacing = self._spacing()
        # The group flushed longest ago goes next, a full interval after its last flush
        # and a share of it after the previous flush of any group. Both count from when
        # those flushes were due, not when they ran: a late flush (the gateway was busy or
        # descheduled) is followed by the next one on time, so lateness never adds up.
        due = max(min(g.flushed_at for g in waiting) + spacing, self._last_flush + spacing / GROUPS)
        if due < now - spacing:
            due = now  # after a quiet spell: start afresh, not to catch up on missed turns
        self._flush_due = due
        self._flush_at = loop.call_at(max(now, due), self.flush)

    def flush(self) -> None:
        """Hand every pending event, in order, to the group flushed longest ago (one
        wake-up per socket); groups without sockets are brought up to date at once."""
        self._flush_at = None
        due, self._flush_due = self._flush_due, None
        end = self._pending_start + len(self._pending)
        waiting = [g for g in self._groups if g.handed < end]
        if waiting:
            for group in waiting:
                if not group.clients:
                    self._hand(group, end)
            waiting = [g for g in waiting if g.clients]
        if waiting:
            group = min(waiting, key=lambda g: g.flushed_at)
            if due is None:
                due = asyncio.get_running_loop().time()
            group.flushed_at = self._last_flush = due
            items = self._pending[group.handed - self._pending_start :]
            self._hand(group, end)
            flush = Flush(items)
            for client in group.clients:
                client.offer_many(flush)
        # Events every group was handed are dropped.
        handed = min(g.handed for g in self._groups)
        if handed > self._pending_start:
            del self._pending[: handed - self._pending_start]
            self._pending_start = handed
        self._schedule()

    def _hand(self, group: _Group, end: int) -> None:
        if end > group.handed:
            group.handed = end
            group.last_seq = self._pending[end - 1 - self._pending_start].stream_seq

    def _note_final(self, item: Item) -> None:
        # Log followers wait for this: told at once, not at the sockets' flush.
        if is_final(item.job["status"]):
            self._recent_final[item.build_id] = item.job["status"]
            if len(self._recent_final) > RECENT_FINAL:
                self._recent_final.popitem(last=False)
            for fut in self._final_waiters.pop(item.build_id, set()):
                if not fut.done():
                    fut.set_result(item.job["status"])

    # --- sockets -----------------------------------------------------------------------
    def register(self, orgs: frozenset[str] | None = None) -> LiveClient:
        """A new socket's queue; `orgs` limits it to those organizations' jobs."""
        client = LiveClient(queue_limit=self.queue_limit, buffer_limit=self.buffer_limit, orgs=orgs)
        group = min(self._groups, key=lambda g: len(g.clients))
        group.clients.add(client)
        self._group_of[client] = group
        self.clients.add(client)
        WS_CLIENTS.set(len(self.clients))
        return client

    def unregister(self, client: LiveClient) -> None:
        group = self._group_of.pop(client, None)
        if group is not None:
            group.clients.discard(client)
        self.clients.discard(client)
        WS_CLIENTS.set(len(self.clients))

    def final_status(self, build_id: int) -> asyncio.Future[str]:
        """A future set to the job's status when the hub sees it become final."""
        fut: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        known = self._recent_final.get(build_id)
        if known is not None:
            fut.set_result(known)
            return fut
        self._final_waiters.setdefault(build_id, set()).add(fut)
        return fut

    def forget_final(self, build_id: int, fut: asyncio.Future[str]) -> None:
        waiters = self._final_waiters.get(build_id)
        if waiters is not None:
            waiters.discard(fut)
            if not waiters:
                del self._final_waiters[build_id]

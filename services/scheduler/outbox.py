"""Performs the machine's effects over NATS. The only place the scheduler writes to
JetStream, KV or core subjects.

Each effect is a round trip (a KV write or a publish waiting for its ack), so the effect
lists of a batch of inputs go out in lanes (`lanes.lanes`): lanes with nothing in common at
the same time; within a lane one list after the other, in input order.

Within a list, a record write (`SaveJob`) is the commit point: it waits until every effect
before it is acknowledged, and every effect after it waits for it. The effects between two
record writes (events, dispatches, cancels, dispatch removals, compaction deletes) go out
together, in the list's order and in one socket write, and are awaited together. Why that
is all the order crash recovery (`Machine.load`) relies on:

- a job's event or dispatch is sent only once the record it announces is stored: the
  record is written by compare-and-set, so only the writer whose CAS won publishes an
  event under that `<build_id>-<seq>` (the leader fence's last line, docs/internals.md),
  and a runner never claims a job that a reload would not know;
- every event, dispatch and removal can be repeated from KV alone (`load` republishes a
  job's current event if the stream's last one differs, and dispatches every dispatchable
  job again under the same `Nats-Msg-Id`), so one that fails or is cut off by a crash
  once its record is stored is repaired: a failure here makes the service reload before
  it takes another input; a crash makes the next leader load;
- nothing reads an event before the dispatch of the same job: the claim that a dispatch
  leads to waits for the scheduler's lock, which this list holds until its last effect
  is acknowledged (or the state is reloaded), so a job's events still reach the stream in
  `seq` order;
- a record write waits for what came before it, so a job's next record (and event) never
  overtakes its previous event, and a queue's next job is saved and dispatched only after
  the record that freed the queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any

from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig
from nats.js.errors import BadRequestError, NotFoundError

from services.common import codec
from services.common.config import Settings
from services.common.jspub import JsPublisher
from services.scheduler.effects import (
    DeleteJob,
    Dispatch,
    DropDispatch,
    Effect,
    PublishEvent,
    SaveJob,
    SendCancel,
)
from services.scheduler.lanes import lanes
from services.scheduler.machine import Machine
from services.scheduler.metrics import EVENTS
from services.scheduler.store import JobStore

log = logging.getLogger(__name__)

DISPATCH_ACK_WAIT_S = 30.0
# At most this many effects of one list in flight at once (a reload republishes, and a
# compaction deletes, one per job: thousands).
MAX_IN_FLIGHT = 256

# Called once a list's record writes are stored, while the effects after them go out.
Saved = Callable[[], Awaitable[None]]


class PerformError(Exception):
    """An effect failed; `done` effects before it were performed."""

    def __init__(self, done: int, cause: BaseException) -> None:
        super().__init__(f"effect {done} failed: {cause!r}")
        self.done = done


class Outbox:
    def __init__(
        self,
        settings: Settings,
        nc: Client,
        js: JetStreamContext,
        pub: JsPublisher,
        store: JobStore,
        fence: Callable[[], None] | None = None,
    ) -> None:
        self.settings = settings
        self.nc = nc
        self.js = js
        self.pub = pub
        self.store = store
        # Raises (leader.NotLeader) once this process no longer holds the leader lease;
        # checked before every effect, so a deposed leader stops writing at once.
        self.fence = fence
        self._consumers: set[tuple[str, str]] = set()
        self._event_counters: dict[str, Any] = {}

    async def perform_all(
        self,
        batches: Sequence[Sequence[Effect]],
        machine: Machine,
        saved: Sequence[Saved | None] | None = None,
    ) -> list[int | PerformError]:
        """Perform every list, independent lists concurrently; per list, all its effects
        were done (its length) or the error that stopped it. A lane stops at its first
        error: the lists after it in that lane are not started (done 0). `saved[i]`, if
        given, is awaited once list i's record writes are stored (see `perform`)."""
        results: list[int | PerformError] = [len(effects) for effects in batches]

        async def lane(indexes: list[int]) -> None:
            for position, index in enumerate(indexes):
                try:
                    await self.perform(batches[index], machine, saved[index] if saved else None)
                except PerformError as exc:
                    results[index] = exc
                    for later in indexes[position + 1 :]:
                        skipped = PerformError(0, exc)
                        skipped.__cause__ = exc.__cause__
                        results[later] = skipped
                    return

        groups = lanes(batches)
        if len(groups) == 1:
            await lane(groups[0])
        else:
            await asyncio.gather(*(lane(group) for group in groups))
        return results

    async def perform(
        self, effects: Sequence[Effect], machine: Machine, saved: Saved | None = None
    ) -> None:
        """Perform one list: each `SaveJob` alone, once everything before it is done; the
        effects between record writes together (the module's docstring says why that
        order is enough). `saved` is awaited after the last record write, before the
        effects after it are sent (a claim's answer then shares their socket write). On a
        failure, PerformError says how many effects from the start were surely done."""
        group: list[tuple[int, Effect]] = []
        for index, effect in enumerate(effects):
            if isinstance(effect, SaveJob):
                await self._together(group, machine)
                group = []
                await self._guarded(index, effect, machine)
            else:
                group.append((index, effect))
                if len(group) >= MAX_IN_FLIGHT:
                    await self._together(group, machine)
                    group = []
        if saved is not None:
            await saved()
        await self._together(group, machine)

    async def _guarded(self, index: int, effect: Effect, machine: Machine) -> None:
        try:
            if self.fence is not None:
                self.fence()
            await self._one(effect, machine)
        except Exception as exc:
            raise PerformError(index, exc) from exc

    async def _together(self, group: list[tuple[int, Effect]], machine: Machine) -> None:
        """Send a group of effects at once and wait for all of them; the first failed one
        (in list order) is the error. One alone is awaited here: no task, and its publish
        joins whatever else this turn of the event loop wrote."""
        if len(group) == 1:
            await self._guarded(*group[0], machine)
            return
        if not group:
            return
        calls: list[Coroutine[Any, Any, None]] = [
            self._guarded(index, effect, machine) for index, effect in group
        ]
        outcomes = await asyncio.gather(*calls, return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome

    async def _one(self, effect: Effect, machine: Machine) -> None:
        s = self.settings.subjects
        match effect:
            case SaveJob(build_id, value):
                await self.store.save(build_id, value)
            case DeleteJob(build_id):
                await self.store.delete(build_id)
            case PublishEvent(organization, environment, build_id, payload, repair):
                subject = s.event(organization, environment, build_id)
                if repair and await self._last_event_id(subject) == payload["event_id"]:
                    return
                ack = await self.pub.publish(
                    subject,
                    codec.dumps(payload),
                    headers={"Nats-Msg-Id": payload["event_id"]},
                )
                if not ack.duplicate:
                    self._event_counter(effect.status).inc()
            case Dispatch(arch, kind, build_id, msg_id, payload):
                await self.ensure_dispatch_consumer(arch, kind)
                ack = await self.pub.publish(
                    s.dispatch(arch, kind), codec.dumps(payload), headers={"Nats-Msg-Id": msg_id}
                )
                machine.note_dispatched(build_id, ack.seq)
            case DropDispatch(seq):
                with contextlib.suppress(NotFoundError):
                    await self.js.delete_msg(s.dispatch_stream, seq)
            case SendCancel(build_id, reason):
                body = {"build_id": build_id, "reason": reason, "requested_by": None}
                await self.nc.publish(s.cancel(build_id), codec.dumps(body))

    def _event_counter(self, status: str) -> Any:
        """EVENTS' child for a status (`labels` looks it up under a lock each time)."""
        counter = self._event_counters.get(status)
        if counter is None:
            counter = self._event_counters[status] = EVENTS.labels(status)
        return counter

    async def _last_event_id(self, subject: str) -> str | None:
        try:
            msg = await self.js.get_last_msg(self.settings.subjects.events_stream, subject)
        except NotFoundError:
            return None
        return str(codec.loads(msg.data or b"{}").get("event_id"))

    async def ensure_dispatch_consumer(self, arch: str, kind: str) -> None:
        """The durable consumer of arch + kind keeps messages for runners that come later
        (a work-queue stream keeps only what some consumer's filter covers)."""
        if (arch, kind) in self._consumers:
            return
        s = self.settings.subjects
        durable = s.dispatch_consumer(arch, kind)
        try:
            await self.js.consumer_info(s.dispatch_stream, durable)
        except NotFoundError:
            config = ConsumerConfig(
                durable_name=durable,
                filter_subject=s.dispatch(arch, kind),
                ack_policy=AckPolicy.EXPLICIT,
                ack_wait=DISPATCH_ACK_WAIT_S,
                max_deliver=-1,
            )
            try:
                await self.js.add_consumer(s.dispatch_stream, config)
            except BadRequestError:
                # A runner created it at the same moment; it is there, which is all we need.
                await self.js.consumer_info(s.dispatch_stream, durable)
            log.info("dispatch consumer created", extra={"consumer": durable})
        self._consumers.add((arch, kind))

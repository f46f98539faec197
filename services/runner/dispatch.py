"""The durable pull consumers a runner takes work from: one per <arch>.<kind>, created by
whoever comes first (runner or scheduler), never one consumer for two filters; and
`Puller`, which waits on all of a runner's consumers at once."""

from __future__ import annotations

import asyncio
import functools
import logging

from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig
from nats.js.errors import BadRequestError

from services.common.config import Settings

log = logging.getLogger(__name__)

ACK_WAIT_S = 30.0


def consumer_config(settings: Settings, arch: str, kind: str) -> ConsumerConfig:
    return ConsumerConfig(
        durable_name=settings.subjects.dispatch_consumer(arch, kind),
        filter_subject=settings.subjects.dispatch(arch, kind),
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=ACK_WAIT_S,
        max_deliver=-1,
    )


async def ensure_consumer(js: JetStreamContext, settings: Settings, arch: str, kind: str) -> str:
    """Create the durable consumer of `<arch>.<kind>` if missing; return its name.

    An existing one is used as it is (the scheduler may have made it with other small
    settings), but only if its filter is ours: nats-py would otherwise silently pull from
    another subject."""
    config = consumer_config(settings, arch, kind)
    stream = settings.subjects.dispatch_stream
    name = str(config.durable_name)
    try:
        await js.add_consumer(stream, config)
    except BadRequestError as exc:
        extra = {"consumer": name, "error": str(exc)}
        log.info("dispatch consumer exists with other settings", extra=extra)
    info = await js.consumer_info(stream, name)
    if info.config.filter_subject != config.filter_subject:
        raise RuntimeError(
            f"consumer {name} filters {info.config.filter_subject!r}, not {config.filter_subject!r}"
        )
    return name


async def subscribe(
    js: JetStreamContext, settings: Settings, arch: str, kind: str
) -> JetStreamContext.PullSubscription:
    name = await ensure_consumer(js, settings, arch, kind)
    return await js.pull_subscribe_bind(name, stream=settings.subjects.dispatch_stream)


async def fetch_one(sub: JetStreamContext.PullSubscription, timeout_s: float) -> list[Msg]:
    """At most one message; none when the queue stayed empty for `timeout_s`."""
    try:
        return await sub.fetch(1, timeout=timeout_s)
    except NatsTimeoutError:
        return []


class Puller:
    """One message at a time from any of a runner's consumers (one per kind).

    Asking each kind in turn, with a wait of `timeout_s` on each, made a job of one kind
    wait up to that long while the runner was waiting on another kind (a runner serves
    terraform and script by default). So a fetch is out on every consumer at once, and
    the first message is the runner's. Whatever else comes (a second kind answering at the
    same moment, or a fetch still out answering while the job runs) is handed back at once
    (nak), for another runner; the job itself is only ever started after a granted claim.
    """

    def __init__(self, subs: list[JetStreamContext.PullSubscription], timeout_s: float) -> None:
        self._subs = subs
        self._timeout_s = timeout_s
        self._fetches: dict[int, asyncio.Task[list[Msg]]] = {}
        self._handing_back: set[asyncio.Task[None]] = set()
        # Between handing out a message and the next call of `next`: the runner is busy.
        self._busy = False

    async def next(self) -> list[Msg]:
        """At most one message; none when no consumer had one within `timeout_s`. A fetch
        that failed (NATS away) raises, as `fetch_one` does, once no message came."""
        self._busy = False
        for index, sub in enumerate(self._subs):
            if index not in self._fetches:
                task = asyncio.create_task(fetch_one(sub, self._timeout_s))
                task.add_done_callback(functools.partial(self._fetched, index))
                self._fetches[index] = task
        await asyncio.wait(self._fetches.values(), return_when=asyncio.FIRST_COMPLETED)
        got: list[Msg] = []
        failure: BaseException | None = None
        for index, task in list(self._fetches.items()):
            if not task.done():
                continue
            del self._fetches[index]
            try:
                got += task.result()
            except (NatsError, TimeoutError) as exc:
                failure = exc
        for msg in got[1:]:
            self._hand_back(msg)
        if got:
            self._busy = True
            return got[:1]
        if failure is not None:
            raise failure
        return []

    def _fetched(self, index: int, task: asyncio.Task[list[Msg]]) -> None:
        """A fetch ended while the runner is busy: what it brought goes back."""
        if not self._busy or self._fetches.get(index) is not task:
            return  # `next` takes it
        del self._fetches[index]
        if task.cancelled() or task.exception() is not None:
            return
        for msg in task.result():
            self._hand_back(msg)

    def _hand_back(self, msg: Msg) -> None:
        task = asyncio.create_task(_nak(msg))
        self._handing_back.add(task)
        task.add_done_callback(self._handing_back.discard)

    async def close(self) -> None:
        """Let the fetches still out end (within `timeout_s`), handing back what they
        bring: a message left unacked would wait out its ack wait before anyone got it."""
        self._busy = True
        if self._fetches:
            await asyncio.wait(list(self._fetches.values()))
        if self._handing_back:
            await asyncio.gather(*self._handing_back, return_exceptions=True)


async def _nak(msg: Msg) -> None:
    try:
        await msg.nak()
    except (NatsError, TimeoutError) as exc:
        # Unacked, it comes back to some runner after the consumer's ack wait anyway.
        log.warning("could not hand a dispatch message back", extra={"error": repr(exc)})

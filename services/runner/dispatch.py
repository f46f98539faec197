"""The durable pull consumers a runner takes work from: one per <arch>.<kind>, created by
whoever comes first (runner or scheduler), never one consumer for two filters; and
`Puller`, which waits on all of a runner's consumers at once."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from nats.aio.client import Client
from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig
from nats.js.errors import BadRequestError

from services.common import pull
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


async def ensure_consumers(
    js: JetStreamContext, settings: Settings, arch: str, kinds: list[str]
) -> list[tuple[str, str]]:
    """The (stream, consumer) of each kind's dispatch consumer, created if missing."""
    stream = settings.subjects.dispatch_stream
    return [(stream, await ensure_consumer(js, settings, arch, kind)) for kind in kinds]


class Puller:
    """One message at a time from any of a runner's consumers (one per kind).

    Asking each kind in turn, with a wait of `timeout_s` on each, made a job of one kind
    wait up to that long while the runner was waiting on another kind (a runner serves
    terraform and script by default). So a pull request (for one message) is open on
    every consumer at once, and the first message is the runner's. Whatever else comes (a
    second kind answering at the same moment, or a request still open answering while the
    job runs) is handed back at once (nak), for another runner; the job itself is only
    ever started after a granted claim. No new request goes out while the runner is busy.
    """

    def __init__(
        self, nc: Client, consumers: list[tuple[str, str]], timeout_s: float, raw: bool = True
    ) -> None:
        self._timeout_s = timeout_s
        self._raw = raw
        self._readers = [
            pull.PullReader(
                nc, stream, name, batch=1, expires_s=timeout_s, on_arrival=self._on_arrival
            )
            for stream, name in consumers
        ]
        self._arrived = asyncio.Event()
        self._started = False
        self._handing_back: set[asyncio.Task[None]] = set()
        # Between handing out a message and the next call of `next`: the runner is busy.
        self._busy = False

    async def next(self) -> list[pull.Delivery]:
        """At most one message; none when no consumer had one within `timeout_s`. A
        consumer gone (deleted, or not answering) raises `pull.ConsumerGone`."""
        if not self._started:
            for reader in self._readers:
                await reader.start(raw=self._raw)
            self._started = True
        self._busy = False
        self._arrived.clear()
        for reader in self._readers:
            await reader.ask()
        if not any(reader.in_hand for reader in self._readers):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), self._timeout_s)
        got = [msg for reader in self._readers for msg in reader.take()]
        for msg in got[1:]:
            self._hand_back(msg)
        if got:
            self._busy = True
        return got[:1]

    def _on_arrival(self) -> None:
        """A delivery (or the end of a request) came: the waiting `next` takes it, or, while
        the runner is busy, it goes back."""
        if not self._busy:
            self._arrived.set()
            return
        for reader in self._readers:
            for msg in reader.take():
                self._hand_back(msg)

    def _hand_back(self, msg: pull.Delivery) -> None:
        task = asyncio.create_task(_nak(msg))
        self._handing_back.add(task)
        task.add_done_callback(self._handing_back.discard)

    async def close(self) -> None:
        """Let the requests still open end (within `timeout_s`), handing back what they
        bring: a message left unacked would wait out its ack wait before anyone got it."""
        self._busy = True
        self._on_arrival()
        for reader in self._readers:
            await reader.over(self._timeout_s + pull.LOST_AFTER_S)
            await reader.stop()
        self._started = False
        if self._handing_back:
            await asyncio.gather(*self._handing_back, return_exceptions=True)


async def _nak(msg: pull.Delivery) -> None:
    try:
        await msg.nak()
    except (NatsError, TimeoutError) as exc:
        # Unacked, it comes back to some runner after the consumer's ack wait anyway.
        log.warning("could not hand a dispatch message back", extra={"error": repr(exc)})

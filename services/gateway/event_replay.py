"""Replaying stored job events for a `/ws` `filter` with `since`: an ephemeral pull consumer
on the narrowest subject filter, read in batches up to a given stream sequence."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from services.common.subjects import Subjects

BATCH = 256


@dataclass(frozen=True)
class ReplayStart:
    """Where a replay after `since` begins; `gap` when the stream no longer has since + 1."""

    start: int
    gap: bool
    first_available: int


def replay_start(since: int, first_seq: int) -> ReplayStart:
    if since + 1 < first_seq:
        return ReplayStart(first_seq, True, first_seq)
    return ReplayStart(since + 1, False, first_seq)


async def first_seq(js: JetStreamContext, subjects: Subjects) -> int:
    info = await js.stream_info(subjects.events_stream)
    # An empty stream reports first_seq = last_seq + 1 (or 0 when never written).
    return max(int(info.state.first_seq), 1)


async def stored_events(
    js: JetStreamContext,
    subjects: Subjects,
    subject_filter: str,
    start: int,
    until: int,
) -> AsyncIterator[tuple[int, str, bytes]]:
    """Yield (stream_seq, subject, data) of the events matching `subject_filter` with
    start <= stream_seq <= until, in order."""
    if until < start:
        return
    config = ConsumerConfig(
        deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
        opt_start_seq=start,
        ack_policy=AckPolicy.NONE,
        inactive_threshold=30.0,
        mem_storage=True,
        num_replicas=1,
    )
    psub = await js.pull_subscribe(subject_filter, stream=subjects.events_stream, config=config)
    name: str | None = None
    try:
        info = await psub.consumer_info()
        name = info.name
        pending = info.num_pending or 0
        while pending > 0:
            try:
                msgs = await psub.fetch(BATCH, timeout=5)
            except NatsTimeoutError:
                # num_pending said there is more: a slow server, not the end.
                continue
            for msg in msgs:
                meta = msg.metadata
                seq = meta.sequence.stream
                pending = meta.num_pending
                if seq > until:
                    return
                yield seq, msg.subject, msg.data
            if msgs and msgs[-1].metadata.sequence.stream >= until:
                return
    finally:
        with contextlib.suppress(Exception):
            await psub.unsubscribe()
        if name is not None:
            with contextlib.suppress(Exception):
                await js.delete_consumer(subjects.events_stream, name)

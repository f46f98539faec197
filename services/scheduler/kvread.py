"""Every key of a KV bucket with its latest value, read completely.

nats-py's KV watcher (`kv.watch`, `kv.watchall`, `kv.keys`) says "initial values done"
(`None`) when the consumer info it asks for right after subscribing shows nothing pending
and nothing received yet. The server counts a message as delivered when its consumer
hands it on, and may answer that request before those deliveries reach us; the marker
then comes first, and a reader that stops there sees part of the bucket or none of it.
Seen under load: a scheduler took over with 0 of its ~160 active jobs (refusing their
claims as final, admitting redelivered submissions again), and a registry read without a
live runner failed that runner's job as `runner-lost`.

Here the count is taken from the consumer itself: at any moment, what it delivered so far
(its delivered consumer sequence) plus what it still has pending is the whole initial set
(plus anything written since), and each delivery carries its consumer sequence; so the
read goes on until the delivery with that sequence is in hand.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import nats.errors
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, ConsumerInfo, DeliverPolicy

_KV_OPERATION = "KV-Operation"
_MARKER_REASON = "Nats-Marker-Reason"
# A message counted at the start may go away before it is read (its key expired, or was
# written again: the bucket keeps one revision); after this long with nothing delivered,
# the consumer is asked whether anything is still on its way.
QUIET_S = 1.0


@dataclass(frozen=True)
class Entry:
    key: str
    revision: int
    value: bytes
    deleted: bool  # a delete or purge marker (or an expiry marker), not a value


def _delivered(info: ConsumerInfo) -> int:
    return int(info.delivered.consumer_seq or 0) if info.delivered else 0


async def latest(js: JetStreamContext, bucket: str, keys: str = ">") -> list[Entry]:
    """The latest entry of every key of `bucket` matching `keys` (a subject pattern)."""
    stream = f"KV_{bucket}"
    prefix = f"$KV.{bucket}."
    # An ephemeral push consumer, as nats-py's own watcher makes (the scheduler's NATS user
    # may create those on the buckets, not pull from them).
    sub = await js.subscribe(
        prefix + keys,
        stream=stream,
        config=ConsumerConfig(ack_policy=AckPolicy.NONE, inactive_threshold=60.0),
        deliver_policy=DeliverPolicy.LAST_PER_SUBJECT,
        manual_ack=True,
    )
    entries: list[Entry] = []
    try:
        info = await sub.consumer_info()
        expected = _delivered(info) + int(info.num_pending or 0)
        seen = 0
        while seen < expected:
            try:
                msg = await sub.next_msg(timeout=QUIET_S)
            except (nats.errors.TimeoutError, TimeoutError):
                # Counted, then gone before it was sent (expired, or written again)?
                info = await sub.consumer_info()
                if not info.num_pending and _delivered(info) <= seen:
                    break
                continue
            meta = msg.metadata
            seen = max(seen, int(meta.sequence.consumer))
            headers = msg.headers or {}
            entries.append(
                Entry(
                    key=msg.subject[len(prefix) :],
                    revision=int(meta.sequence.stream),
                    value=msg.data or b"",
                    deleted=_KV_OPERATION in headers or _MARKER_REASON in headers,
                )
            )
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
    # A key written again while we read comes twice: its latest revision counts.
    newest: dict[str, Entry] = {}
    for entry in entries:
        if entry.key not in newest or entry.revision > newest[entry.key].revision:
            newest[entry.key] = entry
    return sorted(newest.values(), key=lambda e: e.revision)

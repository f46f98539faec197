"""Every key of a KV bucket with its latest value, read completely.

nats-py's KV watcher (`kv.watch`, `kv.watchall`, `kv.keys`) stops at the first delivery
its consumer reports nothing pending after, or at once when the consumer info it asks for
right after subscribing shows nothing pending. While keys are being written (runners
heartbeat; the bucket keeps one revision per key) the server's consumer info right after
creation may say "0 delivered, 0 pending" although keys are there: a scheduler taking
over after a SIGKILL under load loaded 0 of its ~160 active jobs (refusing their claims as
final, failing to create records of redelivered submissions, stalling two minutes), and
registry reads left out live runners (their jobs failed `runner-lost`). Reproduced
outside the stack: 3 keys written every 5 ms, 300 reads each, 5-11 incomplete with the
watcher (and with a consumer of our own counted the same way).

Here no consumer is involved: the stream's subject list (stream info with a subjects
filter, in pages of the server's limit, 100,000 subjects) names every key that has a
message now, and each key's latest entry
is read with a KV get. A key written meanwhile is read at its newer revision; one deleted
or expired meanwhile is left out, as it should be; one created after the list is seen by
the next read (the registry is swept every second; a job record is only created by the
leader doing this read).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError

from services.common import codec

# KV gets in flight at once (a takeover reads every active job's record).
CONCURRENT_GETS = 256


@dataclass(frozen=True)
class Entry:
    key: str
    revision: int
    value: bytes


async def stream_subjects(js: JetStreamContext, stream: str, subjects_filter: str) -> list[str]:
    """Every subject of `stream` matching `subjects_filter` that holds a message now.

    The server lists at most 100,000 subjects per stream info answer and says how many
    there are in all (`total`); nats-py's `stream_info` reads only the first page, so a
    bucket past that size would be read incompletely without a word. Here every page is
    asked for, by offset."""
    names: list[str] = []
    while True:
        request = {"subjects_filter": subjects_filter, "offset": len(names)}
        answer = await js._api_request(
            f"{js._prefix}.STREAM.INFO.{stream}", codec.dumps(request), timeout=js._timeout
        )
        page = (answer.get("state") or {}).get("subjects") or {}
        names += page
        if not page or len(names) >= int(answer.get("total") or 0):
            # A subject may move between pages while messages are written: once each.
            return list(dict.fromkeys(names))


async def latest(js: JetStreamContext, kv: Any, bucket: str, keys: str = ">") -> list[Entry]:
    """The latest value of every live key of `bucket` (the KeyValue `kv`) matching `keys`
    (a subject pattern), by revision."""
    prefix = f"$KV.{bucket}."
    names = [s[len(prefix) :] for s in await stream_subjects(js, f"KV_{bucket}", prefix + keys)]

    async def get(key: str) -> Entry | None:
        try:
            entry = await kv.get(key)
        except KeyNotFoundError:  # deleted (a marker is its last message) or expired
            return None
        if not entry.value:
            return None
        return Entry(key, int(entry.revision or 0), bytes(entry.value))

    found: list[Entry] = []
    for start in range(0, len(names), CONCURRENT_GETS):
        chunk = names[start : start + CONCURRENT_GETS]
        found += [e for e in await asyncio.gather(*(get(k) for k in chunk)) if e is not None]
    return sorted(found, key=lambda e: e.revision)

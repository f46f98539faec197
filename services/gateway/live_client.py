"""One websocket's share of the hub: which events it wants, and its bounded queue.

Pure bookkeeping (no I/O), so the rules are unit-tested without servers: a status event is
never merged or dropped unless the whole backlog is (then the socket gets `resync`); a job
that leaves the filter still gets the update that took it out; a stream sequence is sent at
most once per socket, so a `since` replay never repeats what live delivery already sent.
"""

from __future__ import annotations

import asyncio
from bisect import bisect_right
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from services.common import codec
from services.common.filters import JobFilter
from services.common.schemas import Problem, SchemaError
from services.common.status import Status, is_final
from services.gateway.db import JOB_FIELDS


@dataclass(frozen=True)
class Item:
    """One status event as every socket gets it: decoded for filtering, encoded once."""

    stream_seq: int
    build_id: int
    job: dict[str, Any]
    raw: bytes


# What the hub relies on in an event. The full JSON-Schema check is ingestion's (the stream
# is written only by the scheduler, under NATS permissions); here a cheap one keeps a
# malformed message from breaking filters or frames: it is rejected and counted.
_REQUIRED = frozenset(JOB_FIELDS) | {"event_id"}
_NAMES = ("organization", "environment", "module_type", "module_name", "action", "event_id")
_STATUSES = frozenset(s.value for s in Status)


def _problem(job: Any) -> Problem | None:
    if not isinstance(job, dict):
        return Problem("(body)", "not a JSON object")
    if not _REQUIRED <= job.keys():
        missing = sorted(_REQUIRED - job.keys())
        return Problem(missing[0], "is a required property")
    for key in ("build_id", "seq"):
        value = job[key]
        if type(value) is not int or value < 1:
            return Problem(key, "must be an integer >= 1")
    for key in _NAMES:
        if type(job[key]) is not str:
            return Problem(key, "must be a string")
    if job["status"] not in _STATUSES:
        return Problem("status", "is not a known status")
    if "stream_seq" in job:
        return Problem("stream_seq", "is set by the gateway, not the event")
    return None


def make_item(stream_seq: int, data: bytes) -> Item:
    """Check a `job_event` payload (cheaply, see `_problem`) and encode it once, with its
    `stream_seq` added.

    Raises SchemaError for a bad payload (the caller counts and skips it).
    """
    try:
        job = codec.loads(data)
    except ValueError as exc:
        raise SchemaError("job_event", [Problem("(body)", f"not valid JSON: {exc}")]) from None
    problem = _problem(job)
    if problem is not None:
        raise SchemaError("job_event", [problem])
    job["stream_seq"] = stream_seq
    return Item(stream_seq, job["build_id"], job, codec.dumps(job))


class Flush:
    """One hub flush as every socket is offered it: its items with their sequences and
    total size worked out once, not once per socket."""

    __slots__ = ("items", "seqs", "size")

    def __init__(self, items: list[Item]) -> None:
        self.items = items
        self.seqs = [i.stream_seq for i in items]
        self.size = sum(len(i.raw) for i in items)


# Frames built lately, by (item count, first and last sequence): after a hub flush every
# socket with the same filter takes the same items, one after the other, and they share
# one frame instead of joining the same bytes a thousand times. Several are kept, because
# a socket that was still sending during a flush takes two flushes in one frame.
_FRAMES: dict[tuple[int, int, int], tuple[list[Item], str]] = {}
_FRAMES_KEPT = 16


def jobs_frame(items: list[Item]) -> str:
    """`{"type": "jobs", "items": [...]}` from pre-encoded items, without re-encoding them."""
    key = (len(items), items[0].stream_seq, items[-1].stream_seq) if items else (0, 0, 0)
    hit = _FRAMES.get(key)
    # List equality compares identity first: cheap when the items are the same objects
    # (a filtered socket may take other items between the same two).
    if hit is not None and hit[0] == items:
        return hit[1]
    text = (b'{"type":"jobs","items":[' + b",".join(i.raw for i in items) + b"]}").decode()
    if len(_FRAMES) >= _FRAMES_KEPT:
        del _FRAMES[next(iter(_FRAMES))]  # the oldest
    _FRAMES[key] = (list(items), text)
    return text


class Visibility:
    """Which events a socket is sent: those matching its filter, plus the update that takes
    a job it was sent out of the filter (so the page can show the job's new state) — and
    never one of an organization outside `orgs` (None: the caller may see every one)."""

    def __init__(self, flt: JobFilter, orgs: frozenset[str] | None = None) -> None:
        self.filter = flt
        self.orgs = orgs
        # True only when every event is wanted: then the per-event check is skipped. A
        # socket restricted to some organizations is checked in `wants`, for every event.
        self.everything = flt.is_empty() and orgs is None
        # Jobs this socket was sent that may still change; final ones cannot, so the set
        # stays as small as the number of live jobs.
        self.tracked: set[int] = set()

    def wants(self, item: Item) -> bool:
        if self.orgs is not None and item.job["organization"] not in self.orgs:
            return False
        if self.everything:
            return True
        if self.filter.matches(item.job):
            if is_final(item.job["status"]):
                self.tracked.discard(item.build_id)
            else:
                self.tracked.add(item.build_id)
            return True
        if item.build_id in self.tracked:
            self.tracked.discard(item.build_id)
            return True
        return False


class SentSeqs:
    """The stream sequences a socket was sent, as sorted disjoint ranges, remembering the
    most recent (highest) `limit` of them.

    Live delivery sends increasing sequences, so a socket that sees everything holds one
    range however much it was sent: memory stays flat with a thousand sockets.
    """

    def __init__(self, limit: int = 100_000) -> None:
        self.limit = limit
        # Range i is starts[i]..ends[i], inclusive; ranges neither overlap nor touch.
        self._starts: list[int] = []
        self._ends: list[int] = []
        self._count = 0

    @property
    def highest(self) -> int:
        return self._ends[-1] if self._ends else 0

    def __contains__(self, seq: object) -> bool:
        if not isinstance(seq, int):
            return False
        i = bisect_right(self._starts, seq) - 1
        return i >= 0 and seq <= self._ends[i]

    def add(self, seq: int) -> None:
        starts, ends = self._starts, self._ends
        if ends and seq > ends[-1]:  # the usual case: after everything sent so far
            if seq == ends[-1] + 1:
                ends[-1] = seq
            else:
                starts.append(seq)
                ends.append(seq)
        else:
            i = bisect_right(starts, seq) - 1
            if i >= 0 and seq <= ends[i]:
                return
            joins_left = i >= 0 and ends[i] == seq - 1
            joins_right = i + 1 < len(starts) and starts[i + 1] == seq + 1
            if joins_left and joins_right:
                ends[i] = ends[i + 1]
                del starts[i + 1], ends[i + 1]
            elif joins_left:
                ends[i] = seq
            elif joins_right:
                starts[i + 1] = seq
            else:
                starts.insert(i + 1, seq)
                ends.insert(i + 1, seq)
        self._count += 1
        self._trim()

    def add_many(self, seqs: list[int]) -> None:
        """Add sequences given in increasing order (a flush of the hub, after filtering)."""
        if not seqs:
            return
        first, last = seqs[0], seqs[-1]
        if first > self.highest and last - first + 1 == len(seqs):
            # One run of consecutive sequences after everything sent: one range.
            if self._ends and first == self._ends[-1] + 1:
                self._ends[-1] = last
            else:
                self._starts.append(first)
                self._ends.append(last)
            self._count += len(seqs)
            self._trim()
            return
        for seq in seqs:
            self.add(seq)

    def _trim(self) -> None:
        starts, ends = self._starts, self._ends
        while self._count > self.limit:
            excess = self._count - self.limit
            size = ends[0] - starts[0] + 1
            if size <= excess:
                del starts[0], ends[0]
                self._count -= size
            else:
                starts[0] += excess
                self._count -= excess

    def discard(self, seq: int) -> None:
        starts, ends = self._starts, self._ends
        i = bisect_right(starts, seq) - 1
        if i < 0 or seq > ends[i]:
            return
        if starts[i] == ends[i]:
            del starts[i], ends[i]
        elif seq == starts[i]:
            starts[i] += 1
        elif seq == ends[i]:
            ends[i] -= 1
        else:
            starts.insert(i + 1, seq + 1)
            ends.insert(i + 1, ends[i])
            ends[i] = seq - 1
        self._count -= 1

    def __len__(self) -> int:
        return self._count


@dataclass(frozen=True)
class ReplayWindow:
    """The hand-over of a `since` replay to live delivery.

    `switch` is the hub's last sequence when the replay began: the replay covers
    (since, switch], live delivery everything after max(since, switch). Together they
    cover every sequence after `since` once: no gap, no repeat.
    """

    since: int
    switch: int

    def in_replay(self, seq: int) -> bool:
        return self.since < seq <= self.switch

    def in_live(self, seq: int) -> bool:
        return seq > max(self.since, self.switch)


def merge(replayed: Iterable[Item], buffered: Iterable[Item], window: ReplayWindow) -> list[Item]:
    """What a socket gets from a replay and the live items buffered meanwhile."""
    out = [i for i in replayed if window.in_replay(i.stream_seq)]
    out += [i for i in buffered if window.in_live(i.stream_seq)]
    return out


@dataclass(eq=False)  # identity: the hub keeps clients in a set
class LiveClient:
    """A websocket's queue. The hub calls `offer` for every event; the socket's sender
    takes frames with `take`. Nothing here ever awaits, so one slow socket cannot hold up
    the hub or the others."""

    queue_limit: int = 1000
    buffer_limit: int = 20_000
    # The organizations this socket's caller may see (None: every one); fixed for its life.
    orgs: frozenset[str] | None = None
    visibility: Visibility = field(default_factory=lambda: Visibility(JobFilter()))
    queue: deque[Item] = field(default_factory=deque)
    # The bytes of the items in `queue`, kept up to date so `take` need not add them up.
    queued_bytes: int = 0
    sent: SentSeqs = field(default_factory=SentSeqs)
    resync_reason: str | None = None
    # After a resync, live items are dropped until the client sends a new `filter`.
    paused: bool = False
    replaying: bool = False
    buffer: list[Item] = field(default_factory=list)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    space: asyncio.Event = field(default_factory=asyncio.Event)
    resyncs: int = 0
    # Bumped by a new filter or an overflow, so a running replay knows it is obsolete.
    generation: int = 0

    def __post_init__(self) -> None:
        if self.orgs is not None:
            self.visibility = Visibility(self.visibility.filter, self.orgs)

    def offer(self, item: Item) -> None:
        """A live event from the hub."""
        self.offer_many([item])

    def offer_many(self, items: list[Item] | Flush) -> None:
        """Live events from the hub, in stream order: one flush of the hub."""
        flush = items if isinstance(items, Flush) else Flush(items)
        if self.paused or not flush.items:
            return
        if self.replaying:
            # Filtered only at the hand-over, in order, so that an update taking a job out
            # of the filter is recognised even when the replay had not yet reached it.
            self.buffer.extend(flush.items)
            if len(self.buffer) > self.buffer_limit:
                self.overflow("fell behind during replay")
            return
        self._deliver(flush)

    def _deliver(self, flush: Flush) -> None:
        sent = self.sent
        items = flush.items
        if items[0].stream_seq <= sent.highest or not self.visibility.everything:
            # Only after a replay can a sequence come twice; live ones are all new.
            if items[0].stream_seq <= sent.highest:
                items = [i for i in items if i.stream_seq not in sent]
            if not self.visibility.everything:
                wants = self.visibility.wants
                items = [i for i in items if wants(i)]
            if items is not flush.items:
                flush = Flush(items)
        if not items:
            return
        if len(self.queue) + len(items) > self.queue_limit:
            self.overflow("fell behind: send queue full")
            return
        self.queue.extend(items)
        self.queued_bytes += flush.size
        sent.add_many(flush.seqs)
        self.wake.set()

    def _enqueue(self, item: Item) -> None:
        self.queue.append(item)
        self.queued_bytes += len(item.raw)
        self.sent.add(item.stream_seq)
        self.wake.set()

    def overflow(self, reason: str) -> None:
        """Drop the whole backlog (never a part of it) and ask the client to resync."""
        for item in self.queue:
            self.sent.discard(item.stream_seq)
        self.queue.clear()
        self.queued_bytes = 0
        self.buffer.clear()
        self.replaying = False
        self.paused = True
        self.resync_reason = reason
        self.resyncs += 1
        self.generation += 1
        self.space.set()
        self.wake.set()

    def set_filter(self, flt: JobFilter) -> None:
        """A new filter: what was queued for the old one is not sent."""
        for item in self.queue:
            self.sent.discard(item.stream_seq)
        self.queue.clear()
        self.queued_bytes = 0
        self.buffer.clear()
        self.visibility = Visibility(flt, self.orgs)
        self.replaying = False
        self.paused = False
        self.generation += 1
        self.space.set()

    def begin_replay(self) -> None:
        self.replaying = True
        self.buffer = []

    def room(self) -> bool:
        return len(self.queue) < self.queue_limit

    def add_replayed(self, item: Item) -> bool:
        """A replayed item; the caller waits for `room()` first, so a replay never overflows."""
        if item.stream_seq in self.sent or not self.visibility.wants(item):
            return False
        self._enqueue(item)
        return True

    def end_replay(self, window: ReplayWindow) -> None:
        """Hand over to live: deliver the buffered items after the replay's end."""
        buffered, self.buffer = self.buffer, []
        self.replaying = False
        live = [item for item in buffered if window.in_live(item.stream_seq)]
        if live:
            self._deliver(Flush(live))

    def take(self, max_items: int = 500, max_bytes: int = 512 * 1024) -> list[Item]:
        """The next frame's items: as many as are queued, within both bounds (a single
        bigger item still goes, alone), so clients with a 1 MiB frame limit keep up."""
        queue = self.queue
        if not queue:
            return []
        if len(queue) <= max_items and self.queued_bytes <= max_bytes:
            # The usual case: everything queued fits in one frame.
            items = list(queue)
            queue.clear()
            self.queued_bytes = 0
            self.space.set()
            return items
        items = []
        size = 0
        while queue and len(items) < max_items:
            nxt = len(queue[0].raw)
            if items and size + nxt > max_bytes:
                break
            items.append(queue.popleft())
            size += nxt
        self.queued_bytes -= size
        self.space.set()
        return items

    def take_resync(self) -> str | None:
        reason, self.resync_reason = self.resync_reason, None
        return reason

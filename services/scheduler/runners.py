"""The scheduler's view of the runner registry (KV `xoogify-runners`): who is alive, of which
arch and kinds. Parsing is pure; reading the bucket is one helper at the edge."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from nats.js import JetStreamContext

from services.common import kvread, schemas
from services.common.metrics import reject
from services.common.subjects import Subjects
from services.scheduler.jobs import epoch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunnerInfo:
    runner_id: str
    arch: str
    kinds: frozenset[str]
    state: str
    started_at: float | None = None  # when the runner process registered (epoch s)

    def serves(self, arch: str, kind: str) -> bool:
        """Would take a job of arch + kind (a draining runner takes nothing new)."""
        return self.arch == arch and kind in self.kinds and self.state != "draining"


def parse_registration(key: str, data: bytes) -> RunnerInfo:
    """A registry value as RunnerInfo (SchemaError or ValueError when it is malformed)."""
    value: dict[str, Any] = schemas.decode("runner_registration", data)
    started = value.get("started_at")
    return RunnerInfo(
        runner_id=key,
        arch=value["arch"],
        kinds=frozenset(value["kinds"]),
        state=value["state"],
        started_at=epoch(started) if started else None,
    )


async def read_registry(
    js: JetStreamContext,
    kv: Any,
    bucket: str,
    on_bad: Callable[[str, int, Exception], None] | None = None,
) -> dict[str, RunnerInfo]:
    """Every live key of the bucket with its latest value. Expired keys are simply absent
    (expiry may send no watch event), which is why the scheduler sweeps this. A malformed
    value is left out and passed to `on_bad` (key, revision, error). Read with
    `kvread.latest`: a KV watcher may say it is done before it is, and a live runner left
    out is a job failed as runner-lost."""
    found: dict[str, RunnerInfo] = {}
    for entry in await kvread.latest(js, kv, bucket):
        try:
            found[entry.key] = parse_registration(entry.key, entry.value)
        except (schemas.SchemaError, ValueError) as exc:
            if on_bad is not None:
                on_bad(entry.key, entry.revision, exc)
    return found


class RegistryView:
    """The registry as the scheduler judges it, across NATS outages.

    A key is absent when its runner died, but also when NATS was away long enough for the
    key to expire while its (live) runner could not refresh it. So after an outage (a
    reconnect of our connection, or a sweep that failed), the runners we knew before keep
    their place for one TTL: time for each to heartbeat again. One that does not is lost
    a TTL later than usual; one that does was never lost.
    """

    def __init__(self, ttl_s: float, subjects: Subjects | None = None) -> None:
        self.ttl_s = ttl_s
        self.subjects = subjects or Subjects()
        self._bad_seen: set[tuple[str, int]] = set()
        self._known: dict[str, RunnerInfo] = {}
        self._reconnects = 0
        self._out_of_touch = False
        self._hold_until = 0.0

    def bad_entry(self, key: str, revision: int, error: Exception) -> None:
        """A malformed registration: rejected once per written value, not once per sweep."""
        if (key, revision) in self._bad_seen:
            return
        self._bad_seen.add((key, revision))
        if len(self._bad_seen) > 10_000:  # a bound, in case someone writes junk forever
            self._bad_seen.clear()
        reject("scheduler", self.subjects, self.subjects.runners_bucket, error, key=key)

    def failed(self) -> None:
        """A sweep could not read the registry."""
        self._out_of_touch = True

    def judge(
        self, read: dict[str, RunnerInfo], now: float, reconnects: int
    ) -> dict[str, RunnerInfo]:
        """The runners to count as alive, given a fresh read and our reconnect count."""
        if self._out_of_touch or reconnects != self._reconnects:
            self._out_of_touch = False
            self._reconnects = reconnects
            self._hold_until = now + self.ttl_s
            log.info("registry seen again after an outage; absent runners held one TTL")
        if now < self._hold_until:
            held = {k: v for k, v in self._known.items() if k not in read}
            read = {**held, **read}
        self._known = dict(read)
        return read

"""The scheduler's leader lease: one key in KV `xoogify-leader`, a bucket of its own whose
TTL is the lease's (a bucket's TTL applies to all its keys). Whoever creates the key leads;
it renews by compare-and-set on the revision it last wrote; a standby polls `create`, which
succeeds once the key expired or was released (expiry sends no watch event, so it polls).

The leader also keeps a local deadline: the moment it last *sent* a renew that succeeded,
plus the TTL, minus a safety margin. The key cannot expire on the server before that
moment (the server stamps it later than we sent), so a leader that stops acting at its
deadline has stopped before any standby can take over. `LeaseClock` is that arithmetic,
without I/O; `Lease` is the KV side.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from nats.js.errors import KeyWrongLastSequenceError

from services.common import codec, timefmt

log = logging.getLogger(__name__)

LEASE_KEY = "lease"


class NotLeader(Exception):
    """A write was attempted without a valid lease; nothing was written."""


def holder_name() -> str:
    """Unique per process, readable in logs: host, pid and a random suffix."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


@dataclass(frozen=True)
class LeaseTimes:
    """All lease timings follow from the TTL."""

    ttl_s: float

    @property
    def renew_every_s(self) -> float:
        # Three renewals per TTL: one or two may fail (a NATS node failing over) and the
        # lease still holds.
        return self.ttl_s / 3

    @property
    def safety_s(self) -> float:
        # The leader stops acting this long before the key can expire on the server: room
        # for clocks that tick at slightly different rates and for writes in flight.
        return self.ttl_s / 3

    @property
    def poll_every_s(self) -> float:
        return min(0.5, self.ttl_s / 6)


class LeaseClock:
    """Whether this process holds the lease right now, from what its KV calls answered."""

    def __init__(self, times: LeaseTimes) -> None:
        self.times = times
        self.revision: int | None = None
        self.valid_until = 0.0

    def granted(self, revision: int, sent_at: float) -> None:
        """A create or renew sent at `sent_at` (monotonic) was stored as `revision`."""
        self.revision = revision
        self.valid_until = sent_at + self.times.ttl_s - self.times.safety_s

    def lost(self) -> None:
        self.revision = None
        self.valid_until = 0.0

    def held(self, now: float) -> bool:
        return self.revision is not None and now < self.valid_until

    def remaining(self, now: float) -> float:
        return max(0.0, self.valid_until - now) if self.revision is not None else 0.0


class Lease:
    """The lease as seen by one scheduler process."""

    def __init__(
        self,
        kv: Any,
        ttl_s: float,
        holder: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.kv = kv
        self.times = LeaseTimes(ttl_s)
        self.holder = holder or holder_name()
        self.clock = clock
        self.state = LeaseClock(self.times)

    @property
    def revision(self) -> int | None:
        return self.state.revision

    def held(self) -> bool:
        return self.state.held(self.clock())

    def check(self) -> None:
        """Called right before every state write (outbox): refuse unless still leading."""
        if not self.held():
            raise NotLeader(f"{self.holder} does not hold the scheduler lease")

    def _value(self) -> bytes:
        return codec.dumps({"holder": self.holder, "at": timefmt.now_iso()})

    async def try_acquire(self) -> bool:
        sent = self.clock()
        try:
            revision = await self.kv.create(LEASE_KEY, self._value())
        except KeyWrongLastSequenceError:
            return False  # someone holds it
        except Exception as exc:
            log.warning("lease create failed", extra={"error": repr(exc)})
            return False
        self.state.granted(int(revision), sent)
        return True

    async def renew(self) -> bool:
        """Compare-and-set on our revision; False once the lease is no longer ours."""
        if self.state.revision is None:
            return False
        sent = self.clock()
        try:
            # Not longer than the lease has left: a late answer is of no use.
            revision = await asyncio.wait_for(
                self.kv.update(LEASE_KEY, self._value(), last=self.state.revision),
                max(0.1, self.state.remaining(sent)),
            )
        except KeyWrongLastSequenceError:
            # Another holder wrote it, or it expired: either way it is not ours.
            self.state.lost()
            return False
        except Exception as exc:
            # NATS is away for a moment (a node failing over): keep leading until the
            # local deadline, which `held` enforces.
            log.warning("lease renew failed", extra={"error": repr(exc)})
            return self.held()
        self.state.granted(int(revision), sent)
        return True

    async def acquire(self, stop: asyncio.Event) -> bool:
        """Poll until this process holds the lease (True) or `stop` is set (False)."""
        while not stop.is_set():
            if await self.try_acquire():
                return True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.times.poll_every_s)
        return False

    async def hold(self, stop: asyncio.Event) -> None:
        """Renew until the lease is lost or `stop` is set; returns at the first of them."""
        while not stop.is_set():
            wait = min(self.times.renew_every_s, self.state.remaining(self.clock()))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), wait)
            if stop.is_set():
                return
            await self.renew()
            if not self.held():
                return

    async def release(self) -> None:
        """Give the lease up at once (a clean stop), so a standby need not wait the TTL."""
        revision = self.state.revision
        self.state.lost()
        if revision is None:
            return
        try:
            await self.kv.delete(LEASE_KEY, last=revision)
        except Exception as exc:
            log.warning("lease release failed; it expires by itself", extra={"error": repr(exc)})

"""The runner's entry in KV bucket `xoogify-runners`: registration plus heartbeat.

The bucket's TTL is about three heartbeats, so a runner that stops refreshing its key is
gone from the registry soon after; a runner that cannot refresh it for that long stops
(loudly) rather than run jobs the scheduler already counts as lost.

Busy/idle changes are written at most every `ANNOUNCE_SPACING_S`, the latest state
winning: a runner doing hundreds of short jobs a second would otherwise put its key twice
per job (a JetStream round trip each, CPU in the runner and in NATS) for a state that
people and the API read and no decision depends on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Callable
from importlib import metadata
from typing import Any

from nats.errors import Error as NatsError

from services.common import codec, schemas
from services.common.timefmt import now_iso

log = logging.getLogger(__name__)


def _version() -> str:
    try:
        return metadata.version("xoogify")
    except metadata.PackageNotFoundError:
        return "unknown"


VERSION = _version()

ANNOUNCE_SPACING_S = 0.25


class HeartbeatLost(RuntimeError):
    """The registry key could not be refreshed within its TTL."""


class Registry:
    def __init__(
        self,
        kv: Any,
        runner_id: str,
        arch: str,
        kinds: list[str],
        labels: dict[str, str],
        heartbeat_s: float,
    ) -> None:
        self._kv = kv
        self.runner_id = runner_id
        self.arch = arch
        self.kinds = kinds
        self.labels = labels
        self.heartbeat_s = heartbeat_s
        self.hostname = socket.gethostname()
        self.started_at = now_iso()
        self.state = "idle"
        self.current_build_id: int | None = None
        self._last_ok = time.monotonic()
        self._lock = asyncio.Lock()
        # When the last put began (any put: heartbeat, state change), and the (state,
        # current_build_id) the last successful one wrote.
        self._last_put = -float("inf")
        self._written: tuple[str, int | None] | None = None
        # The background write of `announce`.
        self._writer: asyncio.Task[None] | None = None
        # Called (with why) when this runner was silent longer than the TTL and still runs:
        # its key expired meanwhile, so the scheduler counts its job lost.
        self.on_written_off: Callable[[str], None] | None = None

    def value(self) -> dict[str, Any]:
        value = {
            "runner_id": self.runner_id,
            "arch": self.arch,
            "kinds": self.kinds,
            "labels": self.labels,
            "version": VERSION,
            "hostname": self.hostname,
            "state": self.state,
            "current_build_id": self.current_build_id,
            "started_at": self.started_at,
            "last_seen": now_iso(),
        }
        return dict(schemas.check("runner_registration", value))

    async def put(self) -> None:
        # One writer at a time, so a state change never lands before an older heartbeat.
        async with self._lock:
            self._last_put = time.monotonic()
            written = (self.state, self.current_build_id)
            await self._kv.put(self.runner_id, codec.dumps(self.value()))
            self._last_ok = time.monotonic()
            self._written = written

    def _change(self, state: str, build_id: int | None) -> None:
        if self.state == "draining" and state != "draining":
            state = "draining"  # once draining, always draining
        self.state, self.current_build_id = state, build_id

    async def set_state(self, state: str, build_id: int | None) -> None:
        """Change state and say so at once (not at the next heartbeat)."""
        self._change(state, build_id)
        await self._put_quietly()

    def announce(self, state: str, build_id: int | None) -> None:
        """`set_state` without waiting for the write: a job does not wait for the registry
        (busy/idle are for people and the API; no decision reads them). The write runs in
        the background, `ANNOUNCE_SPACING_S` after the previous put at the earliest, with
        the state of that moment: changes in between are never written (a job shorter
        than the spacing may never show as busy), and the key ends up with the latest."""
        self._change(state, build_id)
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write_latest())

    async def _write_latest(self) -> None:
        while (self.state, self.current_build_id) != self._written:
            wait = self._last_put + ANNOUNCE_SPACING_S - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
                continue  # another put (a heartbeat) may have written it meanwhile
            if not await self._put_quietly():
                return  # NATS away: the next heartbeat writes the state

    async def settle(self) -> None:
        """Until the announced state is written (or its write failed)."""
        if self._writer is not None:
            await self._writer

    async def _put_quietly(self) -> bool:
        try:
            await self.put()
        except (NatsError, TimeoutError) as exc:
            # The heartbeat retries; it alone decides when the runner is lost.
            log.warning("registry update failed", extra={"error": repr(exc)})
            return False
        return True

    async def heartbeat_forever(self) -> None:
        """Refresh the key every `heartbeat_s`; raise HeartbeatLost when it has not been
        refreshed for longer than the TTL (3 heartbeats)."""
        while True:
            await asyncio.sleep(self.heartbeat_s)
            self._check_silence()
            try:
                # A put stuck on a dead connection must not outlive the TTL unnoticed.
                async with asyncio.timeout(max(self.heartbeat_s, 1.0)):
                    await self.put()
            except (NatsError, TimeoutError) as exc:
                silent = time.monotonic() - self._last_ok
                log.warning("heartbeat failed", extra={"error": repr(exc), "silent_s": silent})
                if silent > 3 * self.heartbeat_s:
                    raise HeartbeatLost(
                        f"registry key not refreshed for {silent:.1f}s (TTL "
                        f"{3 * self.heartbeat_s:.1f}s)"
                    ) from exc

    def _check_silence(self) -> None:
        """A runner that was stopped or starved (SIGSTOP, a paused VM) for longer than the
        TTL wakes up with its key expired: whatever job it runs was written off, and the
        workspace may already run the next one, so that job must not go on."""
        silent = time.monotonic() - self._last_ok
        if silent > 3 * self.heartbeat_s and self.on_written_off is not None:
            log.warning("silent longer than the registry TTL", extra={"silent_s": silent})
            self.on_written_off(
                f"runner out of touch for {silent:.1f}s (registry TTL "
                f"{3 * self.heartbeat_s:g}s): its job was counted lost"
            )

    async def remove(self) -> None:
        if self._writer is not None:
            # Its state is moot now; a put of it already sent still lands before the
            # delete (one connection, one stream, in order), a later one would bring the
            # key back.
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer
        try:
            await self._kv.delete(self.runner_id)
        except (NatsError, TimeoutError) as exc:
            log.warning("could not delete registry key", extra={"error": repr(exc)})

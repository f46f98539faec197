"""The `/ws` endpoint: `hello`, live job updates from the hub, `filter` with a `since`
replay, and `follow_logs` (CONTRACT.md, "WebSocket /ws").

One session per socket: a reader for client messages, a sender that drains the socket's
hub queue into `jobs` frames whenever the socket is idle, an optional replay task and a
task per followed log. Every send goes through one lock with a deadline: a client that
stops reading altogether is closed with 1013.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from starlette.websockets import WebSocket, WebSocketDisconnect

from services.common import codec
from services.common.filters import JobFilter
from services.common.metrics import REJECTED
from services.common.schemas import SchemaError
from services.gateway.auth import Principal, principal_of
from services.gateway.context import GatewayContext, context_of
from services.gateway.event_replay import first_seq, replay_start, stored_events
from services.gateway.hub import WS_RESYNCS, Hub
from services.gateway.job_lookup import get_job_soon
from services.gateway.live_client import LiveClient, ReplayWindow, jobs_frame, make_item
from services.gateway.log_follow import LogFollower
from services.gateway.ws_messages import (
    ClientMessageError,
    FilterMsg,
    FollowLogsMsg,
    UnfollowLogsMsg,
    parse,
    parse_query,
)

log = logging.getLogger(__name__)

CLOSE_TRY_AGAIN_LATER = 1013
CLOSE_POLICY_VIOLATION = 1008
MAX_FOLLOWS = 32
CLOSE_WAIT_S = 10.0
# A client may send at most this many messages a second (a burst of as many is fine);
# more is a misbehaving or hostile client, closed with 1008. Messages over 64 KiB are
# refused by the server itself with 1009 (app.server_config's ws_max_size).
MAX_MESSAGES_PER_S = 50.0


class RateLimit:
    """A token bucket: `rate` messages a second, bursts up to `rate`."""

    def __init__(self, rate: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.clock = clock
        self.tokens = rate
        self.at = clock()

    def allow(self) -> bool:
        now = self.clock()
        self.tokens = min(self.rate, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True


class TooManyMessages(Exception):
    """The client sent more than MAX_MESSAGES_PER_S."""


class Stalled(Exception):
    """The client did not take a frame within the stall timeout."""


class Connection:
    """Serialises sends to one socket and notices a client that stopped reading."""

    def __init__(self, websocket: WebSocket, stall_timeout: float) -> None:
        self.websocket = websocket
        self.stall_timeout = stall_timeout
        self.stalled = asyncio.Event()
        self._lock = asyncio.Lock()
        # When the send in progress began (loop time), None between sends: `watch` reads it.
        self.sending_since: float | None = None

    async def send(self, text: str) -> None:
        if self.stalled.is_set():
            raise Stalled()
        async with self._lock:
            # No timer per send (a timeout around each frame to each of a thousand sockets
            # was a tenth of the gateway's CPU in the fan-out): `watch` looks at it instead.
            self.sending_since = asyncio.get_running_loop().time()
            try:
                await self.websocket.send_text(text)
            finally:
                self.sending_since = None

    async def watch(self) -> None:
        """Return, with `stalled` set, once a send has waited longer than the stall timeout
        (the client stopped reading and the socket's buffers are full). Checks a few times
        per timeout, so the close comes between one and 1.25 timeouts after the send."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.stall_timeout / 4)
            since = self.sending_since
            if since is not None and loop.time() - since >= self.stall_timeout:
                self.stalled.set()
                return

    async def send_json(self, value: dict[str, Any]) -> None:
        await self.send(codec.dumps_str(value))


class Session:
    def __init__(
        self,
        ctx: GatewayContext,
        hub: Hub,
        websocket: WebSocket,
        principal: Principal,
        initial: FilterMsg | None = None,
    ) -> None:
        self.ctx = ctx
        self.hub = hub
        self.websocket = websocket
        self.principal = principal
        self.conn = Connection(websocket, hub.stall_timeout)
        scope = principal.scope
        self.client: LiveClient = hub.register(None if scope is None else frozenset(scope))
        self.rate = RateLimit(MAX_MESSAGES_PER_S)
        self.replay: asyncio.Task[None] | None = None
        self.follows: dict[int, asyncio.Task[None]] = {}
        # A filter given in the URL applies from the socket's first instant (registered and
        # filtered in one step), so no update is pushed under the default "everything"
        # first. Its replay is started after `hello`.
        self._pending_replay: ReplayWindow | None = None
        if initial is not None:
            self._pending_replay = self._apply_filter(initial.filter, initial.since)

    async def run(self) -> None:
        # Registered before reading the watermark, in one step: nothing after it is missed.
        await self.conn.send_json({"type": "hello", "watermark": self.hub.watermark(self.client)})
        if self._pending_replay is not None:
            self._start_replay(self.client.visibility.filter, self._pending_replay)
        reader = asyncio.create_task(self._read(), name="ws-reader")
        sender = asyncio.create_task(self._send_jobs(), name="ws-sender")
        stalled = asyncio.create_task(self.conn.watch(), name="ws-stalled")
        flooded = False
        try:
            await asyncio.wait({reader, sender, stalled}, return_when=asyncio.FIRST_COMPLETED)
            flooded = reader.done() and isinstance(reader.exception(), TooManyMessages)
        finally:
            tasks = [reader, sender, stalled, *self.follows.values()]
            if self.replay is not None:
                tasks.append(self.replay)
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        if flooded:
            log.info("closing a websocket that sent too many messages")
            self.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(
                    self.websocket.close(CLOSE_POLICY_VIOLATION, "too many messages"),
                    CLOSE_WAIT_S,
                )
            return
        if self.conn.stalled.is_set():
            log.info("closing a websocket that stopped reading")
            # Off the hub at once; the close frame waits behind the unread backlog, so give
            # the client a while to read up to it before the connection is dropped.
            self.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(
                    self.websocket.close(CLOSE_TRY_AGAIN_LATER, "client is not reading"),
                    CLOSE_WAIT_S,
                )

    def close(self) -> None:
        self.hub.unregister(self.client)

    # --- server → client ---------------------------------------------------------------
    async def _send_jobs(self) -> None:
        client = self.client
        while True:
            await client.wake.wait()
            client.wake.clear()
            reason = client.take_resync()
            if reason is not None:
                WS_RESYNCS.inc()
                await self.conn.send_json({"type": "resync", "reason": reason})
            while items := client.take():
                await self.conn.send(jobs_frame(items))

    async def _error(self, message: str) -> None:
        await self.conn.send_json({"type": "error", "message": message})

    # --- client → server ---------------------------------------------------------------
    async def _read(self) -> None:
        while True:
            try:
                message = await self.websocket.receive()
            except WebSocketDisconnect:
                return
            if message["type"] == "websocket.disconnect":
                return
            if not self.rate.allow():
                raise TooManyMessages()
            raw = message.get("text")
            if raw is None:
                raw = message.get("bytes") or b""
            try:
                parsed = parse(raw)
            except ClientMessageError as exc:
                await self._error(str(exc))
                continue
            if isinstance(parsed, FilterMsg):
                self._set_filter(parsed.filter, parsed.since)
            elif isinstance(parsed, FollowLogsMsg):
                await self._follow(parsed.build_id, parsed.offset)
            elif isinstance(parsed, UnfollowLogsMsg):
                task = self.follows.pop(parsed.build_id, None)
                if task is not None:
                    task.cancel()

    def _set_filter(self, flt: JobFilter, since: int | None) -> None:
        window = self._apply_filter(flt, since)
        if window is not None:
            self._start_replay(flt, window)

    def _apply_filter(self, flt: JobFilter, since: int | None) -> ReplayWindow | None:
        """Filter the socket's live updates and, with `since`, start buffering them; the
        window says what the replay must cover. Never awaits: the switch point and the
        start of buffering are the same instant for the hub."""
        if self.replay is not None:
            self.replay.cancel()
            self.replay = None
        self.client.set_filter(flt)
        if since is None:
            return None
        self.client.begin_replay()
        return ReplayWindow(since, self.hub.watermark(self.client))

    def _start_replay(self, flt: JobFilter, window: ReplayWindow) -> None:
        self.replay = asyncio.create_task(
            self._replay(flt, window, self.client.generation), name="ws-replay"
        )

    async def _replay(self, flt: JobFilter, window: ReplayWindow, generation: int) -> None:
        client = self.client
        subjects = self.ctx.settings.subjects
        try:
            start = replay_start(window.since, await first_seq(self.ctx.js, subjects))
            if start.gap:
                await self.conn.send_json(
                    {"type": "gap", "requested": window.since, "first_available": start.start}
                )
            subject_filter = subjects.events_filter(flt.organization, flt.environment)
            events = stored_events(
                self.ctx.js, subjects, subject_filter, start.start, window.switch
            )
            async for seq, subject, data in events:
                if client.generation != generation:
                    return
                try:
                    item = make_item(seq, data)
                except SchemaError:
                    REJECTED.labels("gateway", subjects.events_filter()).inc()
                    log.warning("bad job event skipped in replay", extra={"subject": subject})
                    continue
                # Wait for room rather than overflow: a replay goes at the client's pace,
                # while live items wait in the (bounded) buffer.
                while not client.room():
                    client.space.clear()
                    await client.space.wait()
                    if client.generation != generation:
                        return
                client.add_replayed(item)
            if client.generation == generation:
                client.end_replay(window)
        except (asyncio.CancelledError, Stalled):
            raise
        except Exception as exc:
            log.warning("replay failed", extra={"error": repr(exc)})
            if client.generation == generation:
                client.overflow("replay failed; take a snapshot and resync")

    async def _follow(self, build_id: int, offset: int) -> None:
        scope = self.principal.scope
        if scope is not None and await get_job_soon(self.ctx, build_id, scope) is None:
            # Another organization's job is answered as missing, as the API does.
            await self._error(f"no job {build_id}")
            return
        old = self.follows.pop(build_id, None)
        if old is not None:
            old.cancel()
        if len(self.follows) >= MAX_FOLLOWS:
            await self._error(f"at most {MAX_FOLLOWS} logs can be followed at once")
            return
        follower = LogFollower(self.ctx, self.conn.send, build_id, offset)
        task = asyncio.create_task(self._run_follow(follower), name=f"ws-log-{build_id}")
        self.follows[build_id] = task

    async def _run_follow(self, follower: LogFollower) -> None:
        try:
            await follower.run()
        except (asyncio.CancelledError, Stalled):
            raise
        except Exception as exc:
            log.warning(
                "log follow failed", extra={"build_id": follower.build_id, "error": repr(exc)}
            )
            with contextlib.suppress(Stalled):
                await self._error(f"following the log of {follower.build_id} failed")
        finally:
            if self.follows.get(follower.build_id) is asyncio.current_task():
                del self.follows[follower.build_id]


async def websocket_endpoint(websocket: WebSocket) -> None:
    ctx = context_of(websocket)
    hub = ctx.hub
    await websocket.accept()
    if hub is None:
        await websocket.close(CLOSE_TRY_AGAIN_LATER, "gateway is starting")
        return
    try:
        initial = parse_query(websocket.query_params)
    except ClientMessageError as exc:
        await websocket.send_text(codec.dumps_str({"type": "error", "message": str(exc)}))
        await websocket.close(CLOSE_POLICY_VIOLATION, "bad filter in the URL")
        return
    session = Session(ctx, hub, websocket, principal_of(websocket), initial)
    try:
        await session.run()
    except (WebSocketDisconnect, Stalled):
        pass
    finally:
        session.close()

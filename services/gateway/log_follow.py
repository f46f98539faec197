"""`follow_logs` on `/ws`: a job's log from a byte offset, then live, with no gap and no
repeat, then `log_end` with the job's final status.

Subscribe first (ordered consumer on the job's log subject from the stream's start), then
send what Postgres has stored from the offset, then the stream's chunks trimmed by offset.
Chunks the stream no longer holds are read from Postgres. When the stream is quiet, the
database is asked again, so a job that ends without an eof chunk (a lost runner, a job that
never ran) still ends the follow.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.api import DeliverPolicy

from services.common import codec, schemas
from services.common.metrics import REJECTED
from services.common.schemas import SchemaError
from services.common.status import is_final
from services.gateway import db
from services.gateway.context import GatewayContext

log = logging.getLogger(__name__)

Send = Callable[[str], Awaitable[None]]
# Log frames stay well under the 1 MiB frame limit of common websocket clients.
READ_LIMIT = 256 * 1024
QUIET_S = 1.0


def trim(offset: int, data: str, pos: int) -> tuple[str, int]:
    """The part of a chunk at byte `offset` that lies at or after byte `pos`, and the
    chunk's end offset. Offsets count UTF-8 bytes; chunks never split a character."""
    raw = data.encode()
    end = offset + len(raw)
    if end <= pos:
        return "", end
    if offset >= pos:
        return data, end
    return raw[pos - offset :].decode(errors="replace"), end


class LogFollower:
    def __init__(self, ctx: GatewayContext, send: Send, build_id: int, offset: int) -> None:
        self.ctx = ctx
        self.send = send
        self.build_id = build_id
        self.pos = offset

    async def _frame(self, data: str, offset: int) -> None:
        frame = {"type": "log", "build_id": self.build_id, "offset": offset, "data": data}
        await self.send(codec.dumps_str(frame))

    async def _send_stored(self, upto: int | None = None) -> bool:
        """Send what Postgres holds from `pos` (up to byte `upto`); True when the stored log
        is complete (job final, everything stored) and all of it was sent."""
        while upto is None or self.pos < upto:
            limit = READ_LIMIT if upto is None else min(READ_LIMIT, upto - self.pos)
            part = await db.read_log(self.ctx.pool, self.build_id, self.pos, limit)
            data = part["data"]
            if not data:
                return bool(part["complete"]) and upto is None
            # The store may move the start forward to a character boundary.
            start = max(self.pos, int(part["offset"]))
            if upto is not None:
                data = data.encode()[: upto - start].decode(errors="ignore")
                if not data:
                    return False
            await self._frame(data, start)
            self.pos = start + len(data.encode())
        return False

    async def _final_status(self) -> str:
        hub = self.ctx.hub
        while True:
            fut = hub.final_status(self.build_id) if hub is not None else None
            try:
                job = await db.get_job(self.ctx.pool, self.build_id)
                if job is not None and is_final(job["status"]):
                    return str(job["status"])
                if fut is None:
                    await asyncio.sleep(QUIET_S)
                    continue
                with contextlib.suppress(TimeoutError):
                    return await asyncio.wait_for(asyncio.shield(fut), 2.0)
            finally:
                if fut is not None and hub is not None:
                    hub.forget_final(self.build_id, fut)
                    fut.cancel()

    async def run(self) -> None:
        subjects = self.ctx.settings.subjects
        sub = await self.ctx.js.subscribe(
            subjects.log(self.build_id),
            stream=subjects.logs_stream,
            ordered_consumer=True,
            deliver_policy=DeliverPolicy.ALL,
            idle_heartbeat=2.0,
        )
        try:
            if not await self._send_stored():
                await self._follow_stream(sub)
            status = await self._final_status()
            end = {"type": "log_end", "build_id": self.build_id, "offset": self.pos}
            await self.send(codec.dumps_str({**end, "status": status}))
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def _follow_stream(self, sub: Any) -> None:
        while True:
            try:
                msg = await sub.next_msg(timeout=QUIET_S)
            except (NatsTimeoutError, TimeoutError):
                if await self._send_stored():
                    return
                continue
            try:
                chunk = schemas.decode("log_chunk", msg.data)
            except SchemaError as exc:
                REJECTED.labels("gateway", self.ctx.settings.subjects.logs_all).inc()
                log.warning("bad log chunk skipped", extra={"error": str(exc)})
                continue
            if chunk["build_id"] != self.build_id:
                continue
            offset = int(chunk["offset"])
            if offset > self.pos:
                # The stream no longer has the bytes before this chunk: Postgres does.
                await self._send_stored(upto=offset)
                if self.pos < offset:
                    log.warning(
                        "log bytes unavailable",
                        extra={"build_id": self.build_id, "from": self.pos, "to": offset},
                    )
                    self.pos = offset
            data, end = trim(offset, chunk["data"], self.pos)
            if data:
                await self._frame(data, self.pos)
            self.pos = max(self.pos, end)
            if chunk["eof"]:
                return

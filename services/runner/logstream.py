"""Streams a job's output to `xoogify.logs.<build_id>` as log chunks.

What goes into the chunks (decoding, masking, cap, offsets) is `LogPipe`; this adds the
clock (a flush at least every 100 ms while there is output, or at once at 32 KiB) and the
publishing. The clock starts with the first output: a job that prints nothing (most
short ones) costs no timer task. The last chunk has `eof: true` and is acked by JetStream
before `close` returns, so the report that follows never overtakes the log.
"""

from __future__ import annotations

import asyncio
import contextlib

from services.common import codec
from services.common.jspub import JsPublisher
from services.runner.counters import LOG_BYTES
from services.runner.logpipe import Chunk, LogPipe
from services.runner.logtext import CHUNK_BYTES
from services.runner.publish import publish_until_acked

FLUSH_INTERVAL_S = 0.1


class LogStream:
    def __init__(
        self,
        pub: JsPublisher,
        subject: str,
        build_id: int,
        attempt: int,
        secrets: list[str],
        cap_bytes: int,
        chunk_bytes: int = CHUNK_BYTES,
        flush_interval_s: float = FLUSH_INTERVAL_S,
    ) -> None:
        self._pub = pub
        self._subject = subject
        self._build_id = build_id
        self._attempt = attempt
        self._pipe = LogPipe(secrets, cap_bytes, chunk_bytes)
        self._interval = flush_interval_s
        self._lock = asyncio.Lock()
        self._ticker: asyncio.Task[None] | None = None

    async def __aenter__(self) -> LogStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._stop_ticker()

    async def _stop_ticker(self) -> None:
        if self._ticker is not None:
            # Never cancel it in the middle of a flush: that chunk would be lost.
            async with self._lock:
                self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
            self._ticker = None

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            await self.flush()

    async def write(self, data: bytes) -> None:
        """Output of the process, as read; publishes at once when a full chunk is ready."""
        self._pipe.write(data)
        if self._pipe.full:
            await self.flush()
        elif self._ticker is None and not self._pipe.ended:
            self._ticker = asyncio.create_task(self._tick())

    async def note(self, line: str) -> None:
        """A line from the runner itself, published at once (see `LogPipe.note`)."""
        self._pipe.note(line)
        await self.flush()

    async def flush(self, eof: bool = False) -> None:
        async with self._lock:
            for chunk in self._pipe.take(eof):
                await self._publish(chunk)

    async def _publish(self, chunk: Chunk) -> None:
        payload = {
            "build_id": self._build_id,
            "offset": chunk.offset,
            "data": chunk.data,
            "eof": chunk.eof,
        }
        # The msg id makes a retried publish (ack lost, NATS blip) one chunk in the stream.
        msg_id = f"log-{self._build_id}-{self._attempt}-{chunk.offset}-{int(chunk.eof)}"
        await publish_until_acked(
            self._pub, self._subject, codec.dumps(payload), {"Nats-Msg-Id": msg_id}
        )
        LOG_BYTES.inc(len(chunk.data.encode()))

    async def close(self) -> None:
        """End of the job: publish everything left and the eof chunk, acked."""
        await self._stop_ticker()
        await self.flush(eof=True)

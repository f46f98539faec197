"""Streams a job's output to `xoogify.logs.<build_id>` as log chunks.

Bytes from the process are decoded (UTF-8, invalid → U+FFFD), masked, capped, and
published in chunks of at most 32 KiB, at least every 100 ms while there is output. The
last chunk has `eof: true` and is acked by JetStream before `close` returns, so the
report that follows never overtakes the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from nats.js import JetStreamContext

from services.common import codec
from services.runner.counters import LOG_BYTES
from services.runner.logtext import CHUNK_BYTES, LogCap, Utf8Stream, split_chunks, utf8_len
from services.runner.masking import Masker, mask_all
from services.runner.publish import publish_until_acked

log = logging.getLogger(__name__)

FLUSH_INTERVAL_S = 0.1


class LogStream:
    def __init__(
        self,
        js: JetStreamContext,
        subject: str,
        build_id: int,
        attempt: int,
        secrets: list[str],
        cap_bytes: int,
        chunk_bytes: int = CHUNK_BYTES,
        flush_interval_s: float = FLUSH_INTERVAL_S,
    ) -> None:
        self._js = js
        self._subject = subject
        self._build_id = build_id
        self._attempt = attempt
        self._secrets = secrets
        self._decoder = Utf8Stream()
        self._masker = Masker(secrets)
        self._cap = LogCap(cap_bytes)
        self._chunk_bytes = chunk_bytes
        self._interval = flush_interval_s
        self._pending = ""
        self._pending_bytes = 0
        self.offset = 0
        self._lock = asyncio.Lock()
        self._ticker: asyncio.Task[None] | None = None
        self._closed = False

    async def __aenter__(self) -> LogStream:
        self._ticker = asyncio.create_task(self._tick())
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._stop_ticker()

    async def _stop_ticker(self) -> None:
        if self._ticker is not None:
            # Never cancel it in the middle of a flush: a chunk sent but not yet counted
            # would leave the next offset wrong.
            async with self._lock:
                self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
            self._ticker = None

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            await self.flush()

    def _add(self, text: str) -> None:
        text = self._cap.take(text)
        if text:
            self._pending += text
            self._pending_bytes += utf8_len(text)

    async def write(self, data: bytes) -> None:
        """Output of the process, as read; publishes at once when a full chunk is ready."""
        self._add(self._masker.feed(self._decoder.decode(data)))
        if self._pending_bytes >= self._chunk_bytes:
            await self.flush()

    async def note(self, line: str) -> None:
        """A line from the runner itself (what it did, why it stopped). It goes after the
        output released so far, is masked too, and is not subject to the cap.

        Output held back (a partial character, the start of a possible secret) stays held
        and follows the note: cutting it off here could print half a secret."""
        text = mask_all(line.rstrip("\n") + "\n", self._secrets)
        self._pending += text
        self._pending_bytes += utf8_len(text)
        await self.flush()

    def _end_output_piece(self) -> None:
        # The end of the output: what was held back can only be masked now, not grow.
        self._add(self._masker.feed(self._decoder.finish()) + self._masker.finish())

    async def flush(self, eof: bool = False) -> None:
        async with self._lock:
            if self._closed:
                return
            text, self._pending, self._pending_bytes = self._pending, "", 0
            pieces = split_chunks(text, self._chunk_bytes)
            if eof and not pieces:
                pieces = [""]
            for i, piece in enumerate(pieces):
                last = eof and i == len(pieces) - 1
                await self._publish(piece, last)
            if eof:
                self._closed = True

    async def _publish(self, data: str, eof: bool) -> None:
        offset = self.offset
        # Counted before the await: if this publish is ever interrupted, later chunks may
        # leave a gap but never overlap this one.
        self.offset += utf8_len(data)
        chunk = {"build_id": self._build_id, "offset": offset, "data": data, "eof": eof}
        # The msg id makes a retried publish (ack lost, NATS blip) one chunk in the stream.
        headers = {"Nats-Msg-Id": f"log-{self._build_id}-{self._attempt}-{offset}-{int(eof)}"}
        await publish_until_acked(self._js, self._subject, codec.dumps(chunk), headers)
        LOG_BYTES.inc(self.offset - offset)

    async def close(self) -> None:
        """End of the job: publish everything left and the eof chunk, acked."""
        await self._stop_ticker()
        self._end_output_piece()
        await self.flush(eof=True)

"""LogStream's clock: output is published within the flush interval while the job runs,
and a job that prints nothing costs no timer task, only its eof chunk."""

from __future__ import annotations

import asyncio
from typing import Any

from services.common import codec
from services.runner.logstream import LogStream


class Stream:
    """What LogStream needs of a JetStream context; keeps what was published."""

    def __init__(self) -> None:
        self.chunks: list[dict[str, Any]] = []
        self.published = asyncio.Event()

    async def publish(self, subject: str, payload: bytes, **_: Any) -> None:
        self.chunks.append(codec.loads(payload))
        self.published.set()


def _stream(js: Stream) -> LogStream:
    return LogStream(js, "xoogify.logs.5", 5, 1, [], 1 << 20, flush_interval_s=0.01)  # type: ignore[arg-type]


async def test_a_quiet_job_is_one_eof_chunk_and_no_clock() -> None:
    js = Stream()
    async with _stream(js) as logs:
        await logs.close()
        assert logs._ticker is None
    assert js.chunks == [{"build_id": 5, "offset": 0, "data": "", "eof": True}]


async def test_output_is_published_by_the_clock_before_the_end() -> None:
    js = Stream()
    async with _stream(js) as logs:
        await logs.write(b"hello\n")
        await js.published.wait()  # no close: only the clock publishes it
        assert js.chunks == [{"build_id": 5, "offset": 0, "data": "hello\n", "eof": False}]
        await logs.write(b"bye\n")
        await logs.close()
    assert js.chunks[-1]["eof"] is True
    assert "".join(c["data"] for c in js.chunks) == "hello\nbye\n"

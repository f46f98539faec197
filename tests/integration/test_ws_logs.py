"""`follow_logs` on /ws against the real gateway app: exactly the bytes after the offset,
from the stream and (when the stream lost them) from Postgres, then `log_end`."""

from __future__ import annotations

import itertools
from typing import Any

import httpx

from services.common.config import Settings
from tests.integration.ws_support import Publisher, job_event, publisher, serve_gateway
from tests.support import WsRecorder, auth_headers, eventually

LINES = [
    "first line\n",
    "zweite Zeile: grün\n",
    "\x1b[31mred\x1b[0m <script>x</script>\n",
    "last\n",
]


def log_text(ws: WsRecorder, build_id: int) -> tuple[str, list[dict[str, Any]]]:
    frames = [m for m in ws.messages if m.get("type") == "log" and m["build_id"] == build_id]
    return "".join(f["data"] for f in frames), frames


async def publish_chunks(pub: Publisher, build_id: int, lines: list[str], start: int) -> int:
    offset = start
    for line in lines:
        await pub.chunk(build_id, offset, line)
        offset += len(line.encode())
    return offset


async def test_follow_from_an_offset_then_live_then_log_end(settings: Settings) -> None:
    full = "".join(LINES).encode()
    async with publisher(settings) as pub, serve_gateway(settings) as gw:
        await pub.event(job_event(5, 1))
        await pub.event(job_event(5, 2, "WORKING"))
        offset = await publish_chunks(pub, 5, LINES[:2], 0)
        async with WsRecorder(gw.ws_url, headers=auth_headers(settings)) as ws:
            await ws.send({"type": "follow_logs", "build_id": 5, "offset": 4})
            # Live part: published after the follow began.
            await ws.wait_for(lambda m: m.get("type") == "log")
            offset = await publish_chunks(pub, 5, LINES[2:], offset)
            await pub.chunk(5, offset, "", eof=True)
            await pub.event(job_event(5, 3, "SUCCESS"))
            end = await ws.wait_for(lambda m: m.get("type") == "log_end")
        text, frames = log_text(ws, 5)
        assert text.encode() == full[4:]  # no gap, no repeat
        assert frames[0]["offset"] == 4
        for a, b in itertools.pairwise(frames):
            assert b["offset"] == a["offset"] + len(a["data"].encode())
        assert end == {"type": "log_end", "build_id": 5, "offset": len(full), "status": "SUCCESS"}


async def test_follow_reads_what_the_stream_lost_from_postgres(settings: Settings) -> None:
    full = "".join(LINES).encode()
    async with publisher(settings) as pub, serve_gateway(settings) as gw:
        for seq, status in enumerate(("IN-PROGRESS", "WORKING"), start=1):
            await pub.event(job_event(6, seq, status))
        offset = await publish_chunks(pub, 6, LINES, 0)
        await pub.chunk(6, offset, "", eof=True)
        await pub.event(job_event(6, 3, "FAILURE"))

        async with httpx.AsyncClient(base_url=gw.url, headers=auth_headers(settings)) as http:

            async def stored() -> bool:
                r = await http.get("/api/jobs/6/logs")
                return r.status_code == 200 and r.json()["complete"]

            await eventually(stored)
        await pub.js.purge_stream(settings.subjects.logs_stream)

        async with WsRecorder(gw.ws_url, headers=auth_headers(settings)) as ws:
            await ws.send({"type": "follow_logs", "build_id": 6, "offset": 11})
            end = await ws.wait_for(lambda m: m.get("type") == "log_end")
        text, _ = log_text(ws, 6)
        assert text.encode() == full[11:]
        assert end["status"] == "FAILURE" and end["offset"] == len(full)


async def test_unfollow_stops_the_log(settings: Settings) -> None:
    async with publisher(settings) as pub, serve_gateway(settings) as gw:
        await pub.event(job_event(7, 1))
        async with WsRecorder(gw.ws_url, headers=auth_headers(settings)) as ws:
            await ws.send({"type": "follow_logs", "build_id": 7, "offset": 0})
            await pub.chunk(7, 0, "one\n")
            await ws.wait_for(lambda m: m.get("type") == "log")
            await ws.send({"type": "unfollow_logs", "build_id": 7})
            # A later message is answered only after the unfollow was handled.
            await ws.send({"type": "bogus"})
            await ws.wait_for(lambda m: m.get("type") == "error")
            await pub.chunk(7, 4, "two\n")
            marker = await pub.event(job_event(8, 1))
            await ws.wait_for_seq(marker)
        text, _ = log_text(ws, 7)
        assert text == "one\n"

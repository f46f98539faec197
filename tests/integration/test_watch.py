"""`xoogify watch` and raw NATS subscribers following the public event stream: one
organization only, resume after a stream sequence, the gap line and `--allow-gap`, and the
same gap as `/ws` reports."""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from nats.js.api import DeliverPolicy

from services.common import codec
from services.common.config import Settings
from services.common.embedded import EmbeddedNats
from tests.integration.ws_support import job_event, publisher, serve_gateway
from tests.stack import settings_env
from tests.support import WsRecorder, auth_headers, eventually


class Watch:
    """`python -m services.cli.main watch …` as a real process, read line by line."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    async def line(self, timeout: float = 15.0) -> dict[str, Any]:
        assert self.proc.stdout is not None
        raw = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        assert raw, "watch ended without a line"
        value: dict[str, Any] = codec.loads(raw)
        return value

    async def lines(self, n: int) -> list[dict[str, Any]]:
        return [await self.line() for _ in range(n)]

    async def exit_code(self, timeout: float = 15.0) -> int:
        return await asyncio.wait_for(self.proc.wait(), timeout)

    async def interrupt(self) -> tuple[int, bytes]:
        self.proc.send_signal(signal.SIGINT)
        code = await self.exit_code()
        assert self.proc.stderr is not None
        return code, await self.proc.stderr.read()


@asynccontextmanager
async def watch(settings: Settings, *args: str) -> AsyncIterator[Watch]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "services.cli.main",
        "watch",
        *args,
        env=settings_env(settings),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        yield Watch(proc)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_a_subscriber_on_one_organization_gets_all_of_it_and_nothing_else(
    settings: Settings,
) -> None:
    async with publisher(settings) as pub:
        ours = []
        for build_id in range(1, 5):
            ours.append(await pub.event(job_event(build_id, 1, org="acme")))
            await pub.event(job_event(100 + build_id, 1, org="globex"))
            ours.append(await pub.event(job_event(build_id, 2, "WORKING", org="acme", env="p")))
        got: list[tuple[int, str]] = []
        done = asyncio.Event()

        async def on_msg(msg: Any) -> None:
            got.append((msg.metadata.sequence.stream, msg.subject))
            if msg.metadata.sequence.stream == ours[-1]:
                done.set()

        await pub.js.subscribe(
            settings.subjects.events_filter("acme"),
            cb=on_msg,
            ordered_consumer=True,
            deliver_policy=DeliverPolicy.ALL,
        )
        await asyncio.wait_for(done.wait(), 10)
    assert [seq for seq, _ in got] == ours
    assert all(subject.split(".")[2] == "acme" for _, subject in got)


async def test_watch_resumes_exactly_after_the_last_event_seen(settings: Settings) -> None:
    async with publisher(settings) as pub:
        first = [await pub.event(job_event(b, 1)) for b in range(1, 4)]
        await pub.event(job_event(50, 1, org="globex"))
        async with watch(settings, "--org", "acme", "--since", "0") as w:
            seen = await w.lines(3)
            assert [line["stream_seq"] for line in seen] == first
            assert seen[0]["build_id"] == 1 and seen[0]["status"] == "IN-PROGRESS"
            live = await pub.event(job_event(1, 2, "WORKING"))
            assert (await w.line())["stream_seq"] == live
            code, err = await w.interrupt()
        assert code in (0, 130) and err == b""
        later = [await pub.event(job_event(b, 2, "WORKING")) for b in (2, 3)]
        await pub.event(job_event(51, 1, org="globex"))
        async with watch(settings, "--org", "acme", "--since", str(live)) as w:
            resumed = await w.lines(2)
            await w.interrupt()
    assert [line["stream_seq"] for line in resumed] == later


async def test_watch_filters_by_environment_status_and_time(settings: Settings) -> None:
    async with publisher(settings) as pub:
        for b in range(1, 4):
            for seq, status in enumerate(("IN-PROGRESS", "WORKING", "SUCCESS"), start=1):
                await pub.event(job_event(b, seq, status, env="stg" if b != 2 else "prod"))
        async with watch(settings, "--env", "stg", "--status", "SUCCESS", "--since", "1h") as w:
            lines = await w.lines(2)
            marker = await pub.event(job_event(9, 3, "SUCCESS"))
            last = await w.line()
            await w.interrupt()
    assert [(x["build_id"], x["status"]) for x in lines] == [(1, "SUCCESS"), (3, "SUCCESS")]
    assert last["stream_seq"] == marker  # nothing else came between


async def test_a_purged_since_prints_the_gap_and_exits_3(settings: Settings) -> None:
    async with publisher(settings) as pub:
        seqs = [await pub.event(job_event(b, 1)) for b in range(1, 6)]
        await pub.js.purge_stream(settings.subjects.events_stream, keep=2)
        async with watch(settings, "--since", str(seqs[0])) as w:
            gap = await w.line()
            code = await w.exit_code()
            assert w.proc.stdout is not None
            rest = await w.proc.stdout.read()
        assert gap == {"type": "gap", "requested": seqs[0], "first_available": seqs[3]}
        assert code == 3 and rest == b""

        async with watch(settings, "--since", str(seqs[0]), "--allow-gap") as w:
            gap2 = await w.line()
            after = await w.lines(2)
            code, _ = await w.interrupt()
    assert gap2 == gap
    assert [line["stream_seq"] for line in after] == seqs[3:]
    assert code in (0, 130)


async def test_watch_and_ws_report_the_same_gap(settings: Settings) -> None:
    async with publisher(settings) as pub, serve_gateway(settings) as gw:
        for b in range(1, 5):
            await pub.event(job_event(b, 1))
        await pub.js.purge_stream(settings.subjects.events_stream)
        kept = await pub.event(job_event(9, 1))
        async with WsRecorder(gw.ws_url, headers=auth_headers(settings)) as ws:
            await ws.send({"type": "filter", "organization": "acme", "since": 1})
            ws_gap = await ws.wait_for(lambda m: m.get("type") == "gap")
        async with watch(settings, "--org", "acme", "--since", "1") as w:
            watch_gap = await w.line()
            assert await w.exit_code() == 3
    assert ws_gap == watch_gap == {"type": "gap", "requested": 1, "first_available": kept}


async def test_watch_carries_on_after_a_nats_restart(
    settings: Settings, nats_server: EmbeddedNats | None
) -> None:
    assert nats_server is not None, "needs its own nats-server to restart"
    async with publisher(settings) as pub:
        before = await pub.event(job_event(1, 1))
        async with watch(settings, "--org", "acme", "--since", "0") as w:
            assert (await w.line())["stream_seq"] == before
            nats_server.stop()
            nats_server.start()

            async def republished() -> int | None:
                try:
                    return await pub.event(job_event(1, 2, "WORKING"))
                except Exception:
                    return None  # still reconnecting

            after = await eventually(republished, timeout=30)
            line = await w.line(timeout=30)
            await pub.event(job_event(1, 3, "SUCCESS"))
            last = await w.line()
            code, err = await w.interrupt()
    assert (line["stream_seq"], line["status"]) == (after, "WORKING")
    assert last["stream_seq"] == after + 1  # no repeat after the consumer was remade
    assert code in (0, 130) and err == b""

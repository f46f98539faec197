"""`fanout`: N websocket clients (default 1,000) on one gateway while 500 job updates/s
flow (events published straight to JetStream). Delivery p99 (publish → received by a
client), missed updates (must be 0: every client gets every update, or a `resync` that
says it did not), and the gateway's RSS from /proc/<pid>/status."""

from __future__ import annotations

import asyncio
import contextlib
import time
from array import array
from dataclasses import dataclass, field

from websockets.asyncio.client import ClientConnection, connect

from bench.job_events import LIFE, job_event, publish
from bench.report import Result, percentile
from bench.stack import BenchStack, Servers, cpu_s, rss_mb, running_stack
from services.common import bus, codec

DEFAULT = 1_000
TINY = 10
RATE = 500  # updates per second
DURATION_S = 10.0
TINY_DURATION_S = 1.0
TICK_S = 0.01
CONNECT_AT_ONCE = 50
SAMPLE_EVERY = 10  # one client in ten parses every frame and measures latency


@dataclass
class Client:
    ws: ClientConnection
    # Only sampled clients parse their frames (latency, order); the others count items
    # in the raw text. One process parsing every frame of a thousand sockets was the
    # bottleneck of the run, not the gateway.
    sampled: bool = False
    received: int = 0
    out_of_order: int = 0
    resyncs: int = 0
    last_seq: int = 0
    done: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class Run:
    expected: int
    # (build_id, seq) → perf_counter at publish; latencies of every receipt, ms.
    published: dict[tuple[int, int], float] = field(default_factory=dict)
    latencies: array[float] = field(default_factory=lambda: array("d"))


async def _read(client: Client, run: Run) -> None:
    with contextlib.suppress(Exception):
        async for raw in client.ws:
            now = time.perf_counter()
            data = raw.encode() if isinstance(raw, str) else raw
            if not client.sampled:
                head = data[:24]
                if b'"resync"' in head:
                    client.resyncs += 1
                elif b'"jobs"' in head:
                    client.received += data.count(b'"stream_seq":')
                if client.received >= run.expected:
                    client.done.set()
                continue
            message = codec.loads(data)
            kind = message.get("type")
            if kind == "resync":
                client.resyncs += 1
            if kind != "jobs":
                continue
            for item in message["items"]:
                if item["stream_seq"] <= client.last_seq:
                    client.out_of_order += 1
                client.last_seq = item["stream_seq"]
                client.received += 1
                sent = run.published.get((item["build_id"], item["seq"]))
                if sent is not None:
                    run.latencies.append((now - sent) * 1000)
            if client.received >= run.expected:
                client.done.set()


async def _connect(url: str, count: int, headers: dict[str, str]) -> list[Client]:
    clients: list[Client] = []
    gate = asyncio.Semaphore(CONNECT_AT_ONCE)

    async def one() -> None:
        async with gate:
            ws = await connect(
                url, max_size=64 * 1024 * 1024, open_timeout=30, additional_headers=headers
            )
            hello = codec.loads(await ws.recv())
            assert hello["type"] == "hello", hello
            clients.append(Client(ws, sampled=len(clients) % SAMPLE_EVERY == 0))

    await asyncio.gather(*(one() for _ in range(count)))
    return clients


async def _publish(bench: BenchStack, run: Run) -> float:
    """Publish `run.expected` updates at RATE/s in 10 ms ticks; return the duration."""
    nc = await bus.connect(bench.settings, "bench-fanout")
    js = nc.jetstream()
    per_tick = max(1, int(RATE * TICK_S))
    futures = []
    start = time.perf_counter()
    try:
        n = 0
        while n < run.expected:
            delay = start + (n / RATE) - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            for _ in range(min(per_tick, run.expected - n)):
                build_id, seq = n // 3 + 1, n % 3 + 1
                run.published[(build_id, seq)] = time.perf_counter()
                futures.append(
                    await publish(
                        js, bench.settings.subjects, job_event(build_id, seq, LIFE[seq - 1])
                    )
                )
                n += 1
        for future in futures:
            await future
        return time.perf_counter() - start
    finally:
        await nc.drain()


async def run(servers: Servers, size: int) -> Result:
    duration = TINY_DURATION_S if size <= TINY else DURATION_S
    expected = int(RATE * duration)
    result = Result(
        "fanout",
        size,
        targets={
            "missed": "0",
            "delivery_p99_ms": "(none set)",
            "gateway_rss_peak_mb": "(none set)",
        },
    )
    run_state = Run(expected)
    async with running_stack(servers) as bench:
        rss_idle = rss_mb(bench.gateway_pid)
        connect_start = time.perf_counter()
        clients = await _connect(bench.ws_url, size, bench.headers)
        connect_s = time.perf_counter() - connect_start
        rss_connected = rss_mb(bench.gateway_pid)
        readers = [asyncio.create_task(_read(c, run_state)) for c in clients]
        peak = rss_connected
        sampling = True

        async def sample() -> None:
            nonlocal peak
            while sampling:
                peak = max(peak, rss_mb(bench.gateway_pid))
                await asyncio.sleep(0.25)

        sampler = asyncio.create_task(sample())
        cpu_start = cpu_s(bench.gateway_pid)
        publish_s = await _publish(bench, run_state)
        # Every client either gets every update or is behind for good (then it is missed).
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(30.0, duration * 3)):
                await asyncio.gather(*(c.done.wait() for c in clients))
        gateway_cpu = cpu_s(bench.gateway_pid) - cpu_start
        sampling = False
        await sampler
        for c in clients:
            await c.ws.close()
        for task in readers:
            task.cancel()
        missed = sum(max(0, expected - c.received) for c in clients)
        if missed:
            bench.keep = True
    lat = list(run_state.latencies)
    result.figures.update(
        {
            "clients": size,
            "updates": expected,
            "updates_per_s": expected / publish_s,
            "deliveries": sum(c.received for c in clients),
            "latency_samples": len(lat),
            "delivery_p50_ms": percentile(lat, 50),
            "delivery_p99_ms": percentile(lat, 99),
            "delivery_max_ms": percentile(lat, 100),
            "missed": missed,
            "resyncs": sum(c.resyncs for c in clients),
            "out_of_order": sum(c.out_of_order for c in clients),
            "connect_s": connect_s,
            "gateway_cpu_s": gateway_cpu,
            "gateway_cpu_us_per_delivery": gateway_cpu / max(1, size * expected) * 1e6,
            "gateway_rss_idle_mb": rss_idle,
            "gateway_rss_connected_mb": rss_connected,
            "gateway_rss_peak_mb": peak,
        }
    )
    if missed:
        result.problem(f"{missed} updates missed across {size} clients")
    if result.figures["out_of_order"]:
        result.problem(f"{result.figures['out_of_order']} updates repeated or out of order")
    result.notes.append(
        f"{expected} updates over {duration:.0f} s; the clients run in this one process, "
        f"on the same 2 cores as the gateway; latency and order are measured on one client "
        f"in {SAMPLE_EVERY}, every client counts what it received"
    )
    return result

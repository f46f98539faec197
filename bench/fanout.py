"""`fanout`: N websocket clients (default 1,000) on one gateway while 500 job updates/s
flow (events published straight to JetStream). Delivery p99 (publish → received by a
client), missed updates (must be 0: every client gets every update, or a `resync` that
says it did not), and the gateway's RSS from /proc/<pid>/status.

The clients run in several worker processes, each with its share of the sockets: one
Python process receiving every frame of a thousand sockets could not keep up, and its
queueing was most of the measured latency. Every client checks the `stream_seq` of every
item it receives (each one exactly once, in order) and every item's latency is measured:
the publisher notes `time.time()` per stream sequence, the workers the receipt of each
frame (CLOCK_REALTIME is one clock for every process of the machine).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import multiprocessing
import os
import re
import time
from array import array
from collections import Counter
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from websockets.asyncio.client import ClientConnection, connect

from bench.cpu import cpu_s
from bench.job_events import LIFE, job_event, publish
from bench.report import Result
from bench.stack import BenchStack, Servers, rss_mb, running_stack
from services.common import bus, codec
from services.common.jspub import JsPublisher

DEFAULT = 1_000
TINY = 10
RATE = 500  # updates per second
DURATION_S = 10.0
TINY_DURATION_S = 1.0
TICK_S = 0.01
CONNECT_AT_ONCE = 50
# Client processes (at most one per socket); XOOGIFY_BENCH_FANOUT_WORKERS overrides.
WORKERS = 4
WORKERS_ENV = "XOOGIFY_BENCH_FANOUT_WORKERS"
# Latencies are counted in buckets of this many ms: 5 M of them would not fit in a list.
BUCKET_MS = 0.01

# The items of a `jobs` frame end with the `stream_seq` the gateway adds: found by a
# regular expression, three times cheaper than decoding the whole frame.
_STREAM_SEQ = re.compile(rb'"stream_seq":(\d+)')


# --- the client processes -----------------------------------------------------------------
@dataclass
class Client:
    ws: ClientConnection
    last_seq: int  # hello's watermark, then the last sequence received
    expected: int
    received: int = 0
    out_of_order: int = 0
    resyncs: int = 0
    done: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class Receipts:
    """Every item received by a worker's clients: the sequences in arrival order, and per
    frame its receipt time and where its sequences end."""

    seqs: array[int] = field(default_factory=lambda: array("q"))
    frame_end: array[int] = field(default_factory=lambda: array("q"))
    frame_at: array[float] = field(default_factory=lambda: array("d"))


async def _read(client: Client, receipts: Receipts) -> None:
    with contextlib.suppress(Exception):
        while True:
            data = await client.ws.recv(decode=False)
            now = time.time()
            if b'"jobs"' not in data[:24]:
                if codec.loads(data).get("type") == "resync":
                    client.resyncs += 1
                continue
            seqs = [int(s) for s in _STREAM_SEQ.findall(data)]
            if not seqs:
                continue
            last = client.last_seq
            if seqs == list(range(last + 1, last + 1 + len(seqs))):
                client.received += len(seqs)  # the usual case: the next ones, in order
            else:
                for seq in seqs:
                    if seq <= last:
                        client.out_of_order += 1
                    else:
                        client.received += 1  # a gap shows as missed at the end
                    last = max(last, seq)
            client.last_seq = max(last, seqs[-1])
            receipts.seqs.extend(seqs)
            receipts.frame_end.append(len(receipts.seqs))
            receipts.frame_at.append(now)
            if client.received >= client.expected:
                client.done.set()


async def _connect(url: str, count: int, headers: dict[str, str], expected: int) -> list[Client]:
    clients: list[Client] = []
    gate = asyncio.Semaphore(CONNECT_AT_ONCE)

    async def one() -> None:
        async with gate:
            ws = await connect(
                url, max_size=64 * 1024 * 1024, open_timeout=30, additional_headers=headers
            )
            hello = codec.loads(await ws.recv())
            assert hello["type"] == "hello", hello
            clients.append(Client(ws, hello["watermark"], expected))

    await asyncio.gather(*(one() for _ in range(count)))
    return clients


def _histogram(receipts: Receipts, published: dict[int, float]) -> Counter[int]:
    """Latency of every item received, in BUCKET_MS buckets."""
    buckets: Counter[int] = Counter()
    seqs, start = receipts.seqs, 0
    for end, at in zip(receipts.frame_end, receipts.frame_at, strict=True):
        for seq in seqs[start:end]:
            sent = published.get(seq)
            if sent is not None:
                buckets[int((at - sent) * 1000 / BUCKET_MS)] += 1
        start = end
    return buckets


async def _worker_main(
    url: str, headers: dict[str, str], count: int, expected: int, conn: Connection
) -> None:
    started = time.perf_counter()
    clients = await _connect(url, count, headers, expected)
    receipts = Receipts()
    readers = [asyncio.create_task(_read(c, receipts)) for c in clients]
    conn.send(("ready", time.perf_counter() - started))
    # The parent's next message is "stop", with the publish times: at the deadline, or
    # after every worker said its clients got everything.
    stop = asyncio.ensure_future(asyncio.to_thread(conn.recv))
    all_done = asyncio.ensure_future(asyncio.gather(*(c.done.wait() for c in clients)))
    await asyncio.wait({stop, all_done}, return_when=asyncio.FIRST_COMPLETED)
    if all_done.done():
        conn.send(("done", None))
    _, published = await stop
    all_done.cancel()
    for task in readers:
        task.cancel()
    await asyncio.gather(*(c.ws.close() for c in clients), return_exceptions=True)
    conn.send(
        (
            "result",
            {
                "received": [c.received for c in clients],
                "out_of_order": sum(c.out_of_order for c in clients),
                "resyncs": sum(c.resyncs for c in clients),
                "frames": len(receipts.frame_at),
                "cpu_s": time.process_time(),
                "latency_buckets": dict(_histogram(receipts, published)),
            },
        )
    )


def worker(url: str, headers: dict[str, str], count: int, expected: int, conn: Connection) -> None:
    """A client process: `count` sockets, reporting through `conn`."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(_worker_main(url, headers, count, expected, conn))
    else:
        uvloop.run(_worker_main(url, headers, count, expected, conn))


class Workers:
    """The client processes, seen from the parent: a thread per pipe reads its messages
    into a queue (a read abandoned at a deadline must not swallow the next message)."""

    def __init__(self, url: str, headers: dict[str, str], size: int, expected: int) -> None:
        # spawn, not fork: the parent runs an event loop and holds the servers' handles.
        ctx = multiprocessing.get_context("spawn")
        count = min(size, int(os.environ.get(WORKERS_ENV, WORKERS)))
        shares = [size // count + (i < size % count) for i in range(count)]
        self.pipes: list[Connection] = []
        self.procs: list[Any] = []
        self.inboxes: list[asyncio.Queue[tuple[str, Any]]] = []
        self._readers: list[asyncio.Task[None]] = []
        for share in shares:
            parent, child = ctx.Pipe()
            proc = ctx.Process(
                target=worker, args=(url, headers, share, expected, child), daemon=True
            )
            proc.start()
            child.close()
            inbox: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
            self.pipes.append(parent)
            self.procs.append(proc)
            self.inboxes.append(inbox)
            self._readers.append(asyncio.create_task(self._pump(parent, inbox)))

    @staticmethod
    async def _pump(pipe: Connection, inbox: asyncio.Queue[tuple[str, Any]]) -> None:
        while True:
            try:
                message = await asyncio.to_thread(pipe.recv)
            except (EOFError, OSError):
                inbox.put_nowait(("exited", None))
                return
            inbox.put_nowait(message)

    async def all_next(self, kind: str) -> list[Any]:
        messages = await asyncio.gather(*(inbox.get() for inbox in self.inboxes))
        for got, _ in messages:
            assert got == kind, f"a fan-out worker said {got!r}, not {kind!r}"
        return [value for _, value in messages]

    async def results(self) -> list[dict[str, Any]]:
        """Each worker's figures, after `stop` (a "done" sent meanwhile is skipped)."""
        out = []
        for inbox in self.inboxes:
            kind, value = await inbox.get()
            if kind == "done":
                kind, value = await inbox.get()
            assert kind == "result", f"a fan-out worker said {kind!r}, not its result"
            out.append(value)
        return out

    def stop(self, published: dict[int, float]) -> None:
        for pipe in self.pipes:
            pipe.send(("stop", published))

    async def close(self) -> None:
        for proc in self.procs:
            await asyncio.to_thread(proc.join, 10)
            if proc.is_alive():
                proc.kill()
        for task in self._readers:
            task.cancel()
        for pipe in self.pipes:
            pipe.close()


# --- the parent: stack, publisher, figures -------------------------------------------------
async def _publish(bench: BenchStack, expected: int, published: dict[int, float]) -> float:
    """Publish `expected` updates at RATE/s in 10 ms ticks, noting the wall-clock time of
    each by its stream sequence; return the duration."""
    nc = await bus.connect(bench.settings, "bench-fanout")
    pub = JsPublisher(nc)
    per_tick = max(1, int(RATE * TICK_S))
    pending: list[tuple[float, Any]] = []
    start = time.perf_counter()
    try:
        await pub.start()
        n = 0
        while n < expected:
            delay = start + (n / RATE) - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            for _ in range(min(per_tick, expected - n)):
                build_id, seq = n // 3 + 1, n % 3 + 1
                event = job_event(build_id, seq, LIFE[seq - 1])
                at = time.time()
                pending.append((at, await publish(pub, bench.settings.subjects, event)))
                n += 1
        for at, future in pending:
            published[int((await future).seq)] = at
        return time.perf_counter() - start
    finally:
        await pub.close()
        await nc.drain()


def _buckets(report: dict[str, Any]) -> Counter[int]:
    return Counter({int(k): v for k, v in report["latency_buckets"].items()})


def _percentile(buckets: Counter[int], p: float) -> float:
    """Nearest-rank percentile of the bucketed latencies (a bucket's upper edge), ms."""
    total = sum(buckets.values())
    if not total:
        return math.nan
    rank = max(1, math.ceil(p / 100 * total))
    seen = 0
    for bucket in sorted(buckets):
        seen += buckets[bucket]
        if seen >= rank:
            return (bucket + 1) * BUCKET_MS
    raise AssertionError("unreachable")


async def run(servers: Servers, size: int) -> Result:
    duration = TINY_DURATION_S if size <= TINY else DURATION_S
    expected = int(RATE * duration)
    result = Result(
        "fanout",
        size,
        targets={
            "missed": "0",
            "delivery_p99_ms": "≤ 150",
            "gateway_rss_peak_mb": "≤ 250",
        },
    )
    published: dict[int, float] = {}
    async with running_stack(servers) as bench:
        rss_idle = rss_mb(bench.gateway_pid)
        workers = Workers(bench.ws_url, bench.headers, size, expected)
        try:
            connect_s = max(await workers.all_next("ready"))
            rss_connected = rss_mb(bench.gateway_pid)
            peak = rss_connected
            sampling = True

            async def sample() -> None:
                nonlocal peak
                while sampling:
                    peak = max(peak, rss_mb(bench.gateway_pid))
                    await asyncio.sleep(0.25)

            sampler = asyncio.create_task(sample())
            cpu_start = cpu_s(bench.gateway_pid)
            publish_s = await _publish(bench, expected, published)
            # Every client either gets every update or is behind for good (then it is
            # missed): wait for every worker's "done", up to a deadline.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(30.0, duration * 3)):
                    await workers.all_next("done")
            gateway_cpu = cpu_s(bench.gateway_pid) - cpu_start
            sampling = False
            await sampler
            workers.stop(published)
            reports = await workers.results()
        finally:
            await workers.close()
        received = [n for r in reports for n in r["received"]]
        missed = sum(max(0, expected - n) for n in received) + expected * (size - len(received))
        if missed:
            bench.keep = True
    frames = sum(r["frames"] for r in reports)
    buckets: Counter[int] = Counter()
    for report in reports:
        buckets.update(_buckets(report))
    result.figures.update(
        {
            "clients": size,
            "client_processes": len(reports),
            "updates": expected,
            "updates_per_s": expected / publish_s,
            "deliveries": sum(received),
            "frames": frames,
            "latency_samples": sum(buckets.values()),
            "delivery_p50_ms": _percentile(buckets, 50),
            "delivery_p90_ms": _percentile(buckets, 90),
            "delivery_p99_ms": _percentile(buckets, 99),
            "delivery_max_ms": _percentile(buckets, 100),
            # Per client process: one far behind the others is the load generator's limit.
            "delivery_p99_ms_by_process": [round(_percentile(_buckets(r), 99), 3) for r in reports],
            "missed": missed,
            "resyncs": sum(r["resyncs"] for r in reports),
            "out_of_order": sum(r["out_of_order"] for r in reports),
            "connect_s": connect_s,
            # The load generator's own CPU (all client processes, connecting included).
            "clients_cpu_s": sum(r["cpu_s"] for r in reports),
            "gateway_cpu_s": gateway_cpu,
            "gateway_cpu_us_per_delivery": gateway_cpu / max(1, size * expected) * 1e6,
            # Each frame is one send; its cost is mostly fixed, the rest per byte.
            "gateway_cpu_us_per_frame": gateway_cpu / max(1, frames) * 1e6,
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
        f"{expected} updates over {duration:.0f} s; the clients run in {len(reports)} "
        f"processes on the same 2 cores as the gateway; every client checks every item's "
        f"stream_seq, and every item's latency is measured"
    )
    return result

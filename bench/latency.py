"""`latency`: a no-op job (`true`) submitted over HTTP → its `SUCCESS` received on `/ws`,
200 jobs at 20 jobs/s. p50/p99 in ms. Target p50 ≤ 4 ms, p99 ≤ 10 ms.

Beside the total, where the time goes, from the job's own timestamps (ms resolution, wall
clock): queued (submitted → started), running (started → finished) and delivery
(finished → received on /ws). And the CPU each process spent per job over the measured
jobs (`bench.cpu.JobCpu`): at 20 jobs/s the machine is mostly idle, but within one
job's few milliseconds the processes it crosses wait for each other's CPU on two cores."""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path

import asyncpg

from bench.cpu import JobCpu
from bench.report import Result, percentile
from bench.stack import Servers, noop_modules, running_stack
from bench.submit import Submitter, noop_job
from bench.ws_watch import FinalWatcher
from services.common.timefmt import parse_time

DEFAULT = 200
TINY = 10
RATE = 20.0  # jobs per second
RUNNERS = 2
WARMUP = 3


def _ms(a: str | None, b: str | None) -> float | None:
    if not a or not b:
        return None
    return (parse_time(b) - parse_time(a)).total_seconds() * 1000


async def run(servers: Servers, size: int) -> Result:
    result = Result(
        "latency", size, targets={"latency_p50_ms": "≤ 4 ms", "latency_p99_ms": "≤ 10 ms"}
    )
    with tempfile.TemporaryDirectory(prefix="xoogify-bench-modules-") as tmp:
        modules = noop_modules(Path(tmp))
        async with (
            running_stack(servers, scheduler=True, runners=RUNNERS, modules_dir=modules) as bench,
            Submitter(bench.url, bench.headers) as http,
            FinalWatcher(bench.ws_url, bench.headers) as watcher,
        ):
            # Warm-up jobs (not counted): first-use costs (connections, imports, caches).
            for n in range(WARMUP):
                build_id, _, _ = await http.submit(noop_job(n))
                await watcher.wait_all({build_id}, timeout=30)
            conn = await asyncpg.connect(bench.settings.database_url)
            try:
                cpu = await JobCpu.measuring(bench, conn)
            finally:
                await conn.close()
            sent: dict[int, float] = {}
            answered: list[float] = []

            async def one(n: int) -> None:
                build_id, t_sent, t_answered = await http.submit(noop_job(n))
                sent[build_id] = t_sent
                answered.append((t_answered - t_sent) * 1000)

            start = time.perf_counter()
            tasks = []
            for n in range(size):
                # Open-loop pacing at RATE: load generation, independent of the answers.
                delay = start + n / RATE - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(one(n)))
            await asyncio.gather(*tasks)
            missing = await watcher.wait_all(set(sent), timeout=60)
            shares = cpu.ms_per_job(size)
            if missing:
                bench.keep = True
    latencies = [
        (watcher.finals[b].received - t) * 1000 for b, t in sent.items() if b not in missing
    ]
    finals = [watcher.finals[b] for b in sent if b not in missing]
    failed = sum(1 for f in finals if f.status != "SUCCESS")
    queued = [
        v for f in finals if (v := _ms(f.item["submitted_at"], f.item["started_at"])) is not None
    ]
    running = [
        v for f in finals if (v := _ms(f.item["started_at"], f.item["finished_at"])) is not None
    ]
    delivery = [
        f.received_wall * 1000 - parse_time(f.item["finished_at"]).timestamp() * 1000
        for f in finals
        if f.item["finished_at"]
    ]
    result.figures.update(
        {
            "jobs": size,
            "latency_p50_ms": percentile(latencies, 50),
            "latency_p99_ms": percentile(latencies, 99),
            "latency_max_ms": percentile(latencies, 100),
            "submit_http_p50_ms": percentile(answered, 50),
            "queued_p50_ms": percentile(queued, 50),
            "running_p50_ms": percentile(running, 50),
            "delivery_p50_ms": percentile(delivery, 50),
            "failed": failed,
            "missing": len(missing),
            **shares,
        }
    )
    if missing:
        result.problem(f"{len(missing)} jobs never reported final on /ws")
    if failed:
        result.problem(f"{failed} jobs ended FAILURE")
    result.notes.append(
        f"{RUNNERS} runners, {WARMUP} warm-up jobs not counted; queued/running/delivery "
        "come from the job's ms timestamps"
    )
    return result

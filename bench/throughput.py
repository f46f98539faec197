"""`throughput`: N no-op jobs (default 1,000; `--size 10000`) on 4 runners, from the first
submit until all are final in Postgres. Jobs per second; target ≥ 1,000/s.

Beside the rate, the CPU each process spent per job over the run (from /proc, start-up
excluded), steadier than the rate on a shared machine: `jobs` is the jobs' own processes
(the runners' reaped children), `bench_client` the load generator."""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path

import asyncpg

from bench.cpu import JobCpu
from bench.report import Result
from bench.stack import Servers, noop_modules, running_stack
from bench.submit import Submitter, noop_job

DEFAULT = 1_000
TINY = 20
RUNNERS = 4
CONCURRENCY = 16  # submissions in flight at once, as many users would
CONNECTIONS = CONCURRENCY


async def _final_counts(conn: asyncpg.Connection) -> tuple[int, int]:
    row = await conn.fetchrow(
        "SELECT count(*) FILTER (WHERE status IN ('SUCCESS', 'FAILURE')) AS final,"
        " count(*) FILTER (WHERE status = 'SUCCESS') AS success FROM jobs"
    )
    assert row is not None  # an aggregate always answers one row
    return int(row["final"]), int(row["success"])


async def run(servers: Servers, size: int) -> Result:
    result = Result("throughput", size, targets={"jobs_per_s": "≥ 1,000/s"})
    with tempfile.TemporaryDirectory(prefix="xoogify-bench-modules-") as tmp:
        modules = noop_modules(Path(tmp))
        async with (
            running_stack(servers, scheduler=True, runners=RUNNERS, modules_dir=modules) as bench,
            Submitter(bench.url, bench.headers, CONNECTIONS) as http,
        ):
            conn = await asyncpg.connect(bench.settings.database_url)
            cpu = await JobCpu.measuring(bench, conn)
            queue: asyncio.Queue[int] = asyncio.Queue()
            for n in range(size):
                queue.put_nowait(n)
            build_ids: list[int] = []

            async def submitter() -> None:
                while not queue.empty():
                    build_id, _, _ = await http.submit(noop_job(queue.get_nowait()))
                    build_ids.append(build_id)

            start = time.perf_counter()
            await asyncio.gather(*(submitter() for _ in range(CONCURRENCY)))
            submitted = time.perf_counter()
            deadline = submitted + max(120.0, size / 5)
            final = success = 0
            # Poll every 20 ms (a measurement, not a synchronisation) until all are final.
            while time.perf_counter() < deadline:
                final, success = await _final_counts(conn)
                if final >= size:
                    break
                await asyncio.sleep(0.02)
            done = time.perf_counter()
            shares = cpu.ms_per_job(size)
            await conn.close()
            if final < size or success < size:
                bench.keep = True
    result.figures.update(
        {
            "jobs": size,
            "jobs_per_s": final / (done - start),
            "submit_per_s": size / (submitted - start),
            "total_s": done - start,
            "succeeded": success,
            "failed": final - success,
            "missing": size - final,
            **shares,
        }
    )
    if final < size:
        result.problem(f"{size - final} of {size} jobs not final within the deadline")
    if success < final:
        result.problem(f"{final - success} jobs ended FAILURE")
    if len(set(build_ids)) != size:
        result.problem(f"{size} submissions gave {len(set(build_ids))} distinct build IDs")
    result.notes.append(f"{RUNNERS} runners, {CONCURRENCY} submissions in flight over HTTP")
    return result

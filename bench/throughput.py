"""`throughput`: N no-op jobs (default 1,000; `--size 10000`) on 4 runners, from the first
submit until all are final in Postgres. Jobs per second; target ≥ 1,000/s.

Beside the rate, the CPU each process spent per job over the run (from /proc, start-up
excluded), steadier than the rate on a shared machine: `jobs` is the jobs' own processes
(the runners' reaped children), `bench_client` the load generator."""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from pathlib import Path

import asyncpg

from bench.ingest import CpuShares, _postgres_root
from bench.report import Result
from bench.stack import BenchStack, Servers, cpu_s, noop_modules, running_stack
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


def _children_cpu_s(pid: int) -> float:
    """CPU seconds of a process's reaped children (cutime + cstime in /proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[13]) + int(fields[14])) / os.sysconf("SC_CLK_TCK")


class JobCpu(CpuShares):
    """`CpuShares` (gateway, NATS, Postgres, load generator) plus the scheduler, the
    runners and the jobs' own processes."""

    def __init__(self, bench: BenchStack, postgres: int | None) -> None:
        procs = bench.stack.procs
        self.scheduler = procs["scheduler"].pid
        self.runners = [proc.pid for name, proc in procs.items() if name.startswith("runner")]
        super().__init__(bench, postgres)

    def _now(self) -> dict[str, float]:
        now = super()._now()
        now["scheduler"] = cpu_s(self.scheduler)
        now["runners"] = sum(cpu_s(pid) for pid in self.runners)
        now["jobs"] = sum(_children_cpu_s(pid) for pid in self.runners)
        return now

    def ms_per_job(self, jobs: int) -> dict[str, float]:
        shares = {
            key.replace("_cpu_us_per_event", "_cpu_ms_per_job"): round(us / 1000, 3)
            for key, us in self.us_per_event(jobs).items()
        }
        return {**shares, "total_cpu_ms_per_job": round(sum(shares.values()), 3)}


async def run(servers: Servers, size: int) -> Result:
    result = Result("throughput", size, targets={"jobs_per_s": "≥ 1,000/s"})
    with tempfile.TemporaryDirectory(prefix="xoogify-bench-modules-") as tmp:
        modules = noop_modules(Path(tmp))
        async with (
            running_stack(servers, scheduler=True, runners=RUNNERS, modules_dir=modules) as bench,
            Submitter(bench.url, bench.headers, CONNECTIONS) as http,
        ):
            conn = await asyncpg.connect(bench.settings.database_url)
            cpu = JobCpu(bench, await _postgres_root(conn))
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

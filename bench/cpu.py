"""CPU seconds per process over a benchmark run, read from /proc: where the cost of an
event or a job goes, a steadier figure than rates on a shared machine."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Self

import asyncpg

from bench.stack import BenchStack

_TICK = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> list[str]:
    """The fields of /proc/<pid>/stat after the command name."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def cpu_s(pid: int) -> float:
    """CPU time (user + system) a process has used so far, in seconds."""
    fields = _stat(pid)
    return (int(fields[11]) + int(fields[12])) / _TICK


def children_cpu_s(pid: int) -> float:
    """CPU seconds of a process's reaped children (cutime + cstime)."""
    fields = _stat(pid)
    return (int(fields[13]) + int(fields[14])) / _TICK


def tree_cpu_s(root: int) -> float:
    """CPU seconds of a process and its children, living and reaped (a Postgres server:
    the postmaster, its backends and background workers)."""
    ticks = 0
    for pid in [root] + [int(p) for p in os.listdir("/proc") if p.isdigit()]:
        try:
            fields = _stat(pid)
        except OSError:
            continue  # gone meanwhile
        if pid == root or int(fields[1]) == root:
            ticks += sum(int(f) for f in fields[11:15])  # utime stime cutime cstime
    return ticks / _TICK


async def postgres_root(conn: asyncpg.Connection) -> int | None:
    """The postmaster's pid when Postgres runs on this machine, else None."""
    backend = await conn.fetchval("SELECT pg_backend_pid()")
    try:
        return int(_stat(backend)[1])
    except OSError:
        return None  # XOOGIFY_BENCH_DATABASE_ADMIN_URL on another machine


def nats_pid(bench: BenchStack) -> int | None:
    """The run's own nats-server (its store is under the run's workdir)."""
    mark = str(bench.workdir).encode()
    for p in os.listdir("/proc"):
        try:
            cmd = Path(f"/proc/{p}/cmdline").read_bytes()
        except OSError:
            continue
        if b"nats-server" in cmd and mark in cmd:
            return int(p)
    return None


class CpuShares:
    """CPU seconds per role (gateway, NATS, Postgres, this load generator) since it was
    made: `us_per_event` for ingestion."""

    def __init__(self, bench: BenchStack, postgres: int | None) -> None:
        self.roles = {"gateway": bench.gateway_pid, "nats": nats_pid(bench), "postgres": postgres}
        self.start = self._now()

    @classmethod
    async def measuring(cls, bench: BenchStack, conn: asyncpg.Connection) -> Self:
        """Start measuring now (`conn` finds the Postgres server)."""
        return cls(bench, await postgres_root(conn))

    def _now(self) -> dict[str, float]:
        now = {"bench_client": time.process_time()}
        for role, pid in self.roles.items():
            if pid is not None:
                now[role] = tree_cpu_s(pid) if role == "postgres" else cpu_s(pid)
        return now

    def per_unit(self, units: int) -> dict[str, float]:
        """CPU seconds per unit of work, by role, since the start."""
        end = self._now()
        return {role: (end[role] - self.start[role]) / units for role in end}

    def us_per_event(self, events: int) -> dict[str, float]:
        return {f"{role}_cpu_us_per_event": s * 1e6 for role, s in self.per_unit(events).items()}


class JobCpu(CpuShares):
    """`CpuShares` plus the scheduler, the runners and the jobs' own processes (the
    runners' reaped children): `ms_per_job`."""

    def __init__(self, bench: BenchStack, postgres: int | None) -> None:
        procs = bench.stack.procs
        self.scheduler = procs["scheduler"].pid
        self.runners = [proc.pid for name, proc in procs.items() if name.startswith("runner")]
        super().__init__(bench, postgres)

    def _now(self) -> dict[str, float]:
        now = super()._now()
        now["scheduler"] = cpu_s(self.scheduler)
        now["runners"] = sum(cpu_s(pid) for pid in self.runners)
        now["jobs"] = sum(children_cpu_s(pid) for pid in self.runners)
        return now

    def ms_per_job(self, jobs: int) -> dict[str, float]:
        shares = {
            f"{role}_cpu_ms_per_job": round(s * 1e3, 3) for role, s in self.per_unit(jobs).items()
        }
        return {**shares, "total_cpu_ms_per_job": round(sum(shares.values()), 3)}

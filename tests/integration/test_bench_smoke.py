"""Every benchmark scenario at its tiny size, as CI runs it: `python -m bench <scenario>
--size tiny --json` as a real process (its own NATS and services, the session's Postgres).
Correctness only — exit 0, the expected figures, nothing missed — never a time."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from typing import Any

import pytest

from bench.report import percentile
from bench.stack import ADMIN_URL_ENV
from services.common import codec
from services.common.config import REPO_ROOT

EXPECTED: dict[str, tuple[str, ...]] = {
    "ingest": ("events_per_s", "stored_events", "missing"),
    "latency": ("latency_p50_ms", "latency_p99_ms", "runners_cpu_ms_per_job", "failed", "missing"),
    "throughput": (
        "jobs_per_s",
        "succeeded",
        "runners_cpu_ms_per_job",
        "total_cpu_ms_per_job",
        "missing",
    ),
    "fanout": ("delivery_p99_ms", "gateway_rss_peak_mb", "missed", "out_of_order"),
    "logs": ("mb_per_s", "exit_to_last_byte_ms", "gaps", "missing"),
    "resync": ("first_page_p99_ms", "filtered_p99_ms", "wrong_answers", "missing"),
    "ceiling": ("nats_core_msgs_per_s", "pg_copy_rows_per_s", "ingest_vs_pg_copy", "missing"),
}
# The figure that says nothing was lost, per scenario.
MISSED = {name: "missed" if name == "fanout" else "missing" for name in EXPECTED}


async def run_bench(scenario: str, admin_url: str) -> tuple[int, str, str]:
    env = dict(os.environ, **{ADMIN_URL_ENV: admin_url})
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench", scenario, "--size", "tiny", "--json",
        cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@pytest.mark.parametrize("scenario", list(EXPECTED))
async def test_scenario_runs_tiny_and_misses_nothing(
    scenario: str, postgres_admin_url: str
) -> None:
    code, out, err = await run_bench(scenario, postgres_admin_url)
    lines = out.strip().splitlines()
    assert code == 0, f"exit {code}\nstdout:\n{out}\nstderr:\n{err[-3000:]}"
    # --json prints exactly one line: the figures.
    assert len(lines) == 1, out
    figures: dict[str, Any] = codec.loads(lines[0])
    assert figures["scenario"] == scenario
    assert figures["ok"] is True and figures["problems"] == []
    for key in EXPECTED[scenario]:
        assert key in figures, f"{scenario}: no {key} in {figures}"
    assert figures[MISSED[scenario]] == 0


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile(values, 100) == 100.0
    assert percentile([7.0], 99) == 7.0

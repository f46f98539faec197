"""`resync`: `GET /api/jobs` — the first page, and filtered by organization + status —
with N jobs stored (default 1,000,000, inserted straight into Postgres with COPY after the
gateway migrated). p50/p99 ms per query, and each answer checked against the rows."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx

from bench.report import Result, percentile
from bench.stack import Servers, running_stack

DEFAULT = 1_000_000
TINY = 2_000
QUERIES = 200
TINY_QUERIES = 20
WARMUP = 5
ORGS = 100
CHUNK = 100_000
COLUMNS = (
    "build_id", "organization", "environment", "module_type", "module_name", "action",
    "status", "reason", "exit_code", "runner_id", "queue_position", "seq", "requested_by",
    "submitted_at", "started_at", "finished_at", "updated_at", "stream_seq",
)  # fmt: skip
ACTIONS = ("PLAN", "APPLY-AUTO", "DESTROY")
FILTER_ORG, FILTER_STATUS = "org7", "FAILURE"


def org_of(i: int) -> str:
    return f"org{i % ORGS}"


def status_of(i: int) -> str:
    # One block of 100 in 20 failed: sparse under an organization, as failures are.
    return "FAILURE" if (i // ORGS) % 20 == 0 else "SUCCESS"


def row(i: int, base: datetime) -> tuple[Any, ...]:
    at = base + timedelta(seconds=i)
    failed = status_of(i) == "FAILURE"
    return (
        i, org_of(i), f"env{i % 7}", "amd64/script", f"mod{i % 20}", ACTIONS[i % 3],
        status_of(i), "exit-code" if failed else None, 1 if failed else 0, "runner-1", None,
        3, "bench", at, at, at, at, 3 * i,
    )  # fmt: skip


async def fill(database_url: str, size: int) -> float:
    """COPY `size` jobs in; return rows/s of the load (indexes included)."""
    base = datetime(2026, 1, 1, tzinfo=UTC)
    conn = await asyncpg.connect(database_url)
    try:
        start = time.perf_counter()
        for lo in range(1, size + 1, CHUNK):
            records = [row(i, base) for i in range(lo, min(lo + CHUNK, size + 1))]
            await conn.copy_records_to_table("jobs", records=records, columns=COLUMNS)
        loaded = time.perf_counter() - start
        await conn.execute("ANALYZE jobs")
    finally:
        await conn.close()
    return size / loaded


async def timed(
    http: httpx.AsyncClient, params: dict[str, str], count: int
) -> tuple[list[float], dict[str, Any]]:
    for _ in range(WARMUP):
        await http.get("/api/jobs", params=params)
    times, answer = [], {}
    for _ in range(count):
        start = time.perf_counter()
        response = await http.get("/api/jobs", params=params)
        times.append((time.perf_counter() - start) * 1000)
        answer = response.json()
    return times, answer


async def run(servers: Servers, size: int) -> Result:
    count = TINY_QUERIES if size <= TINY else QUERIES
    result = Result(
        "resync", size, targets={"first_page_p99_ms": "(none set)", "filtered_p99_ms": "(none set)"}
    )
    async with running_stack(servers) as bench:
        load_rate = await fill(bench.settings.database_url, size)
        async with httpx.AsyncClient(base_url=bench.url, headers=bench.headers, timeout=60) as http:
            first, first_answer = await timed(http, {}, count)
            flt = {"organization": FILTER_ORG, "status": FILTER_STATUS}
            filtered, filtered_answer = await timed(http, flt, count)
    expected_first = list(range(size, max(0, size - 50), -1))
    expected_filtered = [
        i for i in range(size, 0, -1) if org_of(i) == FILTER_ORG and status_of(i) == FILTER_STATUS
    ][:50]
    got_first = [j["build_id"] for j in first_answer.get("items", [])]
    got_filtered = [j["build_id"] for j in filtered_answer.get("items", [])]
    wrong = int(got_first != expected_first) + int(got_filtered != expected_filtered)
    result.figures.update(
        {
            "rows": size,
            "copy_rows_per_s": load_rate,
            "first_page_p50_ms": percentile(first, 50),
            "first_page_p99_ms": percentile(first, 99),
            "filtered_p50_ms": percentile(filtered, 50),
            "filtered_p99_ms": percentile(filtered, 99),
            "filtered_items": len(got_filtered),
            "wrong_answers": wrong,
            "missing": len(set(expected_first) - set(got_first))
            + len(set(expected_filtered) - set(got_filtered)),
        }
    )
    if got_first != expected_first:
        result.problem(f"first page is {got_first[:5]}…, expected {expected_first[:5]}…")
    if got_filtered != expected_filtered:
        result.problem(f"filtered page is {got_filtered[:5]}…, expected {expected_filtered[:5]}…")
    result.notes.append(
        f"{count} sequential requests per query after {WARMUP} warm-ups; filter "
        f"organization={FILTER_ORG}&status={FILTER_STATUS} (1 row in {ORGS * 20})"
    )
    return result

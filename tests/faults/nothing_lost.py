"""The check every fault test ends with: nothing was lost, nothing happened twice.

For the build IDs that got a 202: each is a job in Postgres with a final status; its
events are stored once each, with `seq` contiguous 1..n ending in that final status; it
went WORKING at most once and ran at most once (once exactly if it succeeded, by the
trace module's evidence); every event of the stream is stored in Postgres (or recorded as
rejected) and the ingest watermark reached the stream's end.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections import Counter
from collections.abc import Collection
from pathlib import Path
from typing import Any

import asyncpg
import nats

from services.common.config import REPO_ROOT, Settings
from tests.faults.modules import Trace

FINAL = ("SUCCESS", "FAILURE")


async def wait_all_final(
    database_url: str, build_ids: Collection[int], timeout: float = 240.0
) -> float:
    """Poll Postgres until every build is final; the seconds it took."""
    start = time.monotonic()
    conn = await asyncpg.connect(database_url)
    try:
        while True:
            final = await conn.fetchval(
                "SELECT count(*) FROM jobs WHERE build_id = any($1::bigint[])"
                " AND status = any($2::text[])",
                list(build_ids),
                list(FINAL),
            )
            if final == len(build_ids):
                return time.monotonic() - start
            if time.monotonic() - start > timeout:
                raise AssertionError(
                    f"only {final} of {len(build_ids)} jobs final in Postgres after {timeout}s"
                )
            await asyncio.sleep(0.2)  # a poll interval inside the deadline loop
    finally:
        await conn.close()


async def check_nothing_lost(
    settings: Settings,
    build_ids: Collection[int],
    trace: Trace | None = None,
    *,
    other_jobs: bool = False,
) -> dict[str, Any]:
    """Assert the promises above; return figures for the report. `other_jobs` allows jobs
    beyond `build_ids` in Postgres (a test that also submitted some of its own)."""
    wanted = set(build_ids)
    # Ingestion stores a batch and its watermark in one transaction: once the watermark
    # reaches the stream's end, Postgres holds all of it. A batch left behind would hold it
    # back for ack_wait (30 s), so a short deadline here catches that too.
    last_seq = await _stream_last_seq(settings)
    conn = await asyncpg.connect(settings.database_url)
    try:
        deadline = time.monotonic() + 10
        while True:
            watermark = await conn.fetchval(
                "SELECT max(watermark) FROM ingest_progress WHERE kind = 'events'"
            )
            if watermark == last_seq or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)  # a poll interval inside the deadline loop
        jobs = {
            r["build_id"]: r
            for r in await conn.fetch("SELECT build_id, status, reason, seq FROM jobs")
        }
        events = await conn.fetch(
            "SELECT build_id, seq, status FROM job_events ORDER BY build_id, seq"
        )
        rejected_events = await conn.fetchval(
            "SELECT count(*) FROM rejected_messages WHERE subject LIKE $1",
            f"{settings.subjects.prefix}.events.%",
        )
    finally:
        await conn.close()
    assert watermark == last_seq, f"ingest watermark {watermark}, events stream at {last_seq}"

    missing = sorted(wanted - jobs.keys())
    assert not missing, f"{len(missing)} accepted jobs never reached Postgres: {missing[:20]}"
    if not other_jobs:
        extra = sorted(jobs.keys() - wanted)
        assert not extra, f"jobs nobody submitted: {extra[:20]}"
    not_final = {b: jobs[b]["status"] for b in wanted if jobs[b]["status"] not in FINAL}
    assert not not_final, f"{len(not_final)} jobs not final: {dict(list(not_final.items())[:20])}"

    per_build: dict[int, list[tuple[int, str]]] = {}
    for e in events:
        per_build.setdefault(e["build_id"], []).append((e["seq"], e["status"]))
    pairs = Counter((e["build_id"], e["seq"]) for e in events)
    duplicates = [p for p, n in pairs.items() if n > 1]
    assert not duplicates, f"events stored twice: {duplicates[:20]}"
    working_twice = []
    for build_id in wanted:
        history = per_build.get(build_id, [])
        seqs = [s for s, _ in history]
        assert seqs == list(range(1, len(seqs) + 1)), f"build {build_id}: event seqs {seqs}"
        assert seqs and seqs[-1] == jobs[build_id]["seq"], f"build {build_id}: {history}"
        assert history[-1][1] == jobs[build_id]["status"], f"build {build_id}: {history}"
        if sum(1 for _, status in history if status == "WORKING") > 1:
            working_twice.append(build_id)
    assert not working_twice, f"jobs that went WORKING twice: {working_twice[:20]}"

    # Every event the stream holds is in Postgres (or recorded as rejected).
    assert len(events) + rejected_events == last_seq, (
        f"stream holds {last_seq} events, Postgres {len(events)} (+{rejected_events} rejected)"
    )

    statuses = Counter(
        jobs[b]["status"] if jobs[b]["reason"] is None else f"FAILURE/{jobs[b]['reason']}"
        for b in wanted
    )
    figures: dict[str, Any] = {
        "jobs_accepted": len(wanted),
        "jobs_final": sum(statuses.values()),
        "final_statuses": dict(statuses),
        "events_in_stream": last_seq,
        "events_stored": len(events),
        "events_lost": 0,
        "events_duplicated": 0,
        "jobs_working_twice": 0,
    }
    if trace is not None:
        runs = trace.runs()
        twice = sorted(b for b, n in runs.items() if n > 1)
        assert not twice, f"jobs executed twice: {twice[:20]}"
        unknown = sorted(runs.keys() - jobs.keys())
        assert not unknown, f"executions of builds Postgres does not know: {unknown[:20]}"
        succeeded = {b for b in wanted if jobs[b]["status"] == "SUCCESS"}
        never_ran = sorted(succeeded - runs.keys())
        assert not never_ran, f"SUCCESS without an execution: {never_ran[:20]}"
        figures["executions"] = sum(runs.values())
        figures["jobs_run_twice"] = 0
    return figures


async def _stream_last_seq(settings: Settings) -> int:
    nc = await nats.connect(settings.nats_url)
    try:
        state = (await nc.jetstream().stream_info(settings.subjects.events_stream)).state
    finally:
        await nc.close()
    # Nothing is ever deleted from the events stream in these tests (retention is 30 days),
    # so its last sequence is also the number of events it holds.
    assert state.messages == state.last_seq, state
    return int(state.last_seq)


def record_figures(name: str, figures: dict[str, Any]) -> None:
    """Print the figures (seen with -s) and keep them in test-artifacts/faults/ for
    docs/reliability.md."""
    line = json.dumps({"test": name, **figures}, sort_keys=True)
    print(line)
    directory = Path(os.environ.get("XOOGIFY_ARTIFACTS", REPO_ROOT / "test-artifacts")) / "faults"
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{name}.json").write_text(line + "\n")

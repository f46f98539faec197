"""Property test of the gateway's merge of status events into the job row, through the real
ingestion code (`Ingestor._store`: event_rows plus the SQL upsert) into a real Postgres.

Whatever order the events of several jobs arrive in, however often each is delivered and
however the deliveries are cut into batches, the stored job is the one built from its
highest `seq`, it never moves backwards on the way, each event is stored once, and the
variables of the first event are kept.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.common import codec, schemas
from services.common.config import Settings
from services.common.filters import JobFilter
from services.gateway import db
from services.gateway.ingest import Decoded, Ingestor
from services.gateway.watermark import Contiguity
from tests.integration.ws_support import job_event, serve_gateway

RANK = {"IN-PROGRESS": 0, "WORKING": 1, "SUCCESS": 2, "FAILURE": 2}
VARIABLES = {"REGION": "eu-west-1", "TOKEN": "***"}


@st.composite
def job_life(draw: st.DrawFn, build_id: int) -> list[dict[str, Any]]:
    """The events of one job, seq 1..n: queued (its position counting down), maybe
    running, maybe ended."""
    queued = draw(st.integers(min_value=0, max_value=2))
    events = [
        job_event(build_id, seq, queue_position=(queued - seq + 1) or None)
        for seq in range(1, queued + 2)
    ]
    ran = draw(st.booleans())
    if ran:
        events.append(job_event(build_id, len(events) + 1, "WORKING"))
    end = draw(st.sampled_from([None, "SUCCESS", "FAILURE"] if ran else [None, "FAILURE"]))
    if end == "SUCCESS" or (end == "FAILURE" and ran):
        events.append(job_event(build_id, len(events) + 1, end))
    elif end == "FAILURE":
        extra = {"reason": "cancelled", "exit_code": None}
        events.append(job_event(build_id, len(events) + 1, "FAILURE", **extra))
    events[0]["variables"] = dict(VARIABLES)
    for event in events:
        schemas.check("job_event", event)
    return events


@st.composite
def deliveries(draw: st.DrawFn) -> tuple[list[list[dict[str, Any]]], list[list[dict[str, Any]]]]:
    """(each job's events, the batches they are stored in: shuffled, some delivered again,
    cut anywhere)."""
    lives = [draw(job_life(build_id)) for build_id in range(1, draw(st.integers(1, 4)) + 1)]
    events = [e for life in lives for e in life]
    again = draw(st.lists(st.sampled_from(events), max_size=8))
    arrived = draw(st.permutations(events + again))
    cuts = draw(st.lists(st.booleans(), min_size=len(arrived), max_size=len(arrived)))
    batches: list[list[dict[str, Any]]] = [[]]
    for event, cut in zip(arrived, cuts, strict=True):
        batches[-1].append(event)
        if cut:
            batches.append([])
    return lives, [b for b in batches if b]


@pytest.fixture
async def ingestor(settings: Settings) -> AsyncIterator[Ingestor]:
    """The real ingestion code on the gateway's pool (migrated Postgres, real NATS); the
    gateway's own consumer has nothing to read, the test feeds batches itself."""
    async with serve_gateway(settings) as gw:
        ingestor = Ingestor(dataclasses.replace(gw.app.state.ctx, gateway_id="props"), "events")
        try:
            yield ingestor
        finally:
            # It keeps a pooled connection between batches; run() would give it back.
            await ingestor._drop_connections()


def stored_view(job: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in job.items() if k != "events"}


def built_from(event: dict[str, Any]) -> dict[str, Any]:
    """The job row a reader expects from its newest event (plus the first one's variables)."""
    job = {k: event[k] for k in db.JOB_FIELDS}
    job["variables"] = VARIABLES
    return job


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(case=deliveries())
async def test_stored_job_is_built_from_its_highest_seq_whatever_the_delivery(
    ingestor: Ingestor,
    case: tuple[list[list[dict[str, Any]]], list[list[dict[str, Any]]]],
) -> None:
    lives, batches = case
    pool = ingestor.ctx.pool
    # In the order the webhook filler (running in this gateway) takes them: the other
    # order could deadlock with it.
    await pool.execute("TRUNCATE ingest_progress, job_events, jobs")
    ingestor.progress = Contiguity()
    stream_seq = 0
    for batch in batches:
        decoded = []
        for event in batch:
            stream_seq += 1
            subject = f"xoogify.events.acme.stg.{event['build_id']}"
            decoded.append(Decoded(stream_seq, subject, event, None, codec.dumps(event)))
        before = {j["build_id"]: j for j in (await db.list_jobs(pool, _ANY, 50, None))[0]}
        await ingestor._store(decoded)
        after = {j["build_id"]: j for j in (await db.list_jobs(pool, _ANY, 50, None))[0]}
        for build_id, job in before.items():
            # A late or repeated event never moves a stored job backwards.
            assert after[build_id]["seq"] >= job["seq"]
            assert RANK[after[build_id]["status"]] >= RANK[job["status"]]
        for status in RANK:
            # Lists by status, unfinished ones through the index of unfinished jobs, agree
            # with the jobs as stored (status changes leave no stale index entry behind).
            listed = (await db.list_jobs(pool, JobFilter(status=status), 50, None))[0]
            assert listed == [j for j in after.values() if j["status"] == status]
    for life in lives:
        build_id = life[0]["build_id"]
        job = await db.get_job(pool, build_id)
        assert job is not None
        assert stored_view(job) == built_from(life[-1])
        assert [(e["seq"], e["status"]) for e in job["events"]] == [
            (e["seq"], e["status"]) for e in life
        ]
    assert await pool.fetchval("SELECT max(watermark) FROM ingest_progress") == stream_seq


_ANY = JobFilter()

"""A NATS store that was lost (a new volume, a wiped data dir, another server) while
Postgres kept its jobs.

JetStream then numbers every stream from 1 again, and without this:
- the next submission gets a build ID an old job has: its events are taken for stale ones
  (their `seq` is not above the stored job's) and its log chunks for the old job's;
- the events and logs streams start below the stored watermarks: ingestion waits for a
  sequence the new streams reach only much later, and stores nothing meanwhile;
- the jobs that were not final went with the scheduler's records and their dispatch:
  nothing would ever end them, and a lock of the state backend they held would stay.

So at start, before it ingests anything or accepts a submission, the gateway compares each
stream's last sequence with what Postgres holds from it (the highest build ID for the
submit stream, the watermarks for events and logs). A stream behind Postgres was reset:
when empty, it is purged up to just past that value, which makes that the next sequence,
so numbering goes on where the lost store stopped (`xoogify up` does the same
for the subscribers' copy of the events stream, `align_subscribers`). When
the submit and events streams were both reset and the scheduler's bucket is empty too (the
whole store, not one stream an operator deleted, nor jobs written into Postgres by hand),
the jobs stored not final are recorded `FAILURE`/`internal`. Their last event exists only
in Postgres (it was never on the lost stream): the page shows it from its next snapshot
on, and webhooks that ask for `FAILURE` get it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import asyncpg
import nats
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from services.common import nats_auth
from services.common.config import Settings
from services.common.job_object import advanced
from services.common.status import FINAL, Reason, Status
from services.common.subjects import event_msg_id
from services.common.timefmt import now_iso
from services.gateway import db, webhook_delivery

log = logging.getLogger(__name__)

# The last line of such a job's log (its log is marked complete with it: nothing more of
# it can come).
LOST_NOTE = (
    "\n[xoogify] the NATS store was lost with this job's record and dispatch: "
    "recorded FAILURE (internal)\n"
)

_NOT_FINAL = """
SELECT * FROM jobs WHERE build_id <= $1 AND NOT status = ANY ($2::text[])
 ORDER BY build_id FOR UPDATE
"""
_EVENTS = """
INSERT INTO job_events (event_id, build_id, seq, status, at, reason, runner_id, exit_code,
                        queue_position, stream_seq, payload)
SELECT e.event_id, e.build_id, e.seq, e.status, e.updated_at, e.reason, e.runner_id,
       e.exit_code, e.queue_position, $2, p.payload
  FROM unnest($1::jsonb[]) AS p (payload),
       jsonb_to_record(p.payload) AS e (event_id text, build_id bigint, seq integer,
           status text, updated_at timestamptz, reason text, runner_id text,
           exit_code integer, queue_position integer)
ON CONFLICT (event_id) DO NOTHING
"""
_JOBS = """
UPDATE jobs SET status = e.status, reason = e.reason, exit_code = NULL, queue_position = NULL,
       seq = e.seq, finished_at = e.finished_at, updated_at = e.updated_at, stream_seq = $2
  FROM unnest($1::jsonb[]) AS p (payload),
       jsonb_to_record(p.payload) AS e (build_id bigint, seq integer, status text,
           reason text, finished_at timestamptz, updated_at timestamptz)
 WHERE jobs.build_id = e.build_id AND jobs.seq < e.seq
"""
# After what is stored of each log, unless it has its end already.
_NOTE = """
INSERT INTO job_log_chunks (build_id, "offset", size, data, eof)
SELECT b, coalesce((SELECT max(c."offset" + c.size) FROM job_log_chunks c
                     WHERE c.build_id = b), 0), octet_length($2), $2, true
  FROM unnest($1::bigint[]) AS b
 WHERE NOT EXISTS (SELECT 1 FROM job_log_chunks c WHERE c.build_id = b AND c.eof)
ON CONFLICT (build_id, "offset") DO NOTHING
"""


@dataclass(frozen=True)
class Repair:
    """What `repair` found and did."""

    reset: list[str]  # the streams found behind Postgres (and purged forward)
    ended: list[int]  # build IDs recorded FAILURE


async def repair(pool: asyncpg.Pool, js: JetStreamContext, settings: Settings) -> Repair:
    subjects = settings.subjects
    build = int(await pool.fetchval("SELECT coalesce(max(build_id), 0) FROM jobs"))
    events = await db.watermark(pool, "events")
    reset = [
        stream
        for stream, mark in (
            (subjects.submit_stream, build),
            (subjects.events_stream, events),
            (subjects.logs_stream, await db.watermark(pool, "logs")),
        )
        if await number_on(js, stream, mark)
    ]
    ended: list[int] = []
    # The whole store: both streams the scheduler's work shows in, and its bucket.
    whole = {subjects.submit_stream, subjects.events_stream} <= set(reset)
    if whole and await _scheduler_state_lost(js, settings):
        ended = await end_lost_jobs(pool, build, events)
        if ended:
            log.error(
                "jobs not final when the NATS store was lost recorded FAILURE",
                extra={"count": len(ended), "build_ids": ended[:20]},
            )
    return Repair(reset, ended)


async def number_on(js: JetStreamContext, stream: str, mark: int) -> bool:
    """Make `mark` + 1 the next sequence of `stream` if it is behind `mark` and empty (a lost
    store); True when it was. One behind but holding messages (written to since the loss,
    by a service that outlived it) is only logged: a purge would take them with it."""
    state = (await js.stream_info(stream)).state
    last = int(state.last_seq)
    if last >= mark:
        return False
    if state.messages:
        log.error(
            "NATS stream behind Postgres but not empty: not renumbered",
            extra={"stream": stream, "last_seq": last, "stored": mark},
        )
        return False
    # Purging an empty stream up to N makes N its next sequence. Several gateways starting
    # at once purge to the same point (one Postgres): harmless.
    await js.purge_stream(stream, seq=mark + 1)
    log.error(
        "NATS stream behind Postgres: its store was lost; numbering continues",
        extra={"stream": stream, "last_seq": last, "stored": mark, "next": mark + 1},
    )
    return True


async def _scheduler_state_lost(js: JetStreamContext, settings: Settings) -> bool:
    """Whether the scheduler's bucket holds no record: its jobs cannot come back."""
    try:
        info = await js.stream_info(f"KV_{settings.subjects.sched_bucket}")
    except NotFoundError:
        return True
    return int(info.state.messages) == 0


def lost_event(job: dict[str, Any], at: str) -> dict[str, Any]:
    """The job's next event: `FAILURE`/`internal`, as the scheduler would have sent it."""
    failed = advanced(
        job, at, status=Status.FAILURE.value, reason=Reason.INTERNAL.value, exit_code=None
    )
    return {**failed, "event_id": event_msg_id(int(job["build_id"]), failed["seq"])}


async def end_lost_jobs(pool: asyncpg.Pool, up_to: int, watermark: int) -> list[int]:
    """Record every stored job up to build `up_to` that is not final as `FAILURE`; the
    events get `stream_seq` = `watermark` (what a snapshot already reflects)."""
    async with pool.acquire() as conn, conn.transaction():
        rows = await conn.fetch(_NOT_FINAL, up_to, sorted(FINAL))
        if not rows:
            return []
        at = now_iso()
        events = []
        for row in rows:
            job = db.job_from_row(row)
            job.pop("variables", None)
            events.append(lost_event(job, at))
        await conn.execute(_EVENTS, events, watermark)
        await conn.execute(_JOBS, events, watermark)
        # As the outbox filler would have made them; its scan never reaches these.
        await webhook_delivery.fill_events(conn, [e["event_id"] for e in events])
        ended = [int(e["build_id"]) for e in events]
        await conn.execute(_NOTE, ended, LOST_NOTE)
    return ended


async def align_subscribers(url: str, settings: Settings, database_url: str) -> bool:
    """The subscribers' copy of the events stream numbered on from the same point as
    `repair` numbers the services' one (or its sequences would no longer match), as
    `subscribers-admin` at `url`; before the services start (`xoogify up`, `xoogify
    subscriber-stream`). True when it was behind."""
    conn = await asyncpg.connect(database_url)
    try:
        watermark = await db.watermark(conn)
    except asyncpg.UndefinedTableError:
        watermark = 0  # not migrated yet: nothing stored
    finally:
        await conn.close()
    nc = await nats.connect(url, inbox_prefix=nats_auth.inbox_prefix(nats_auth.SUBSCRIBERS_ADMIN))
    try:
        return await number_on(nc.jetstream(), settings.subjects.events_stream, watermark)
    finally:
        await nc.close()

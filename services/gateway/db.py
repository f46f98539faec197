"""The gateway's queries: jobs, their events, their logs, and the ingestion watermark.

SQL stays SQL with parameters; the filters' meaning comes from services.common.filters.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import asyncpg

from services.common import codec
from services.common.filters import JobFilter
from services.common.status import is_final
from services.common.timefmt import format_time
from services.gateway.log_text import read_span

JOB_FIELDS = (
    "build_id",
    "organization",
    "environment",
    "module_type",
    "module_name",
    "action",
    "status",
    "reason",
    "exit_code",
    "runner_id",
    "queue_position",
    "seq",
    "requested_by",
    "submitted_at",
    "started_at",
    "finished_at",
    "updated_at",
)
_TIME_FIELDS = ("submitted_at", "started_at", "finished_at", "updated_at")
_SELECT_JOB = "SELECT " + ", ".join(JOB_FIELDS) + ", variables FROM jobs"

# Every filter is a parameter; with plan_cache_mode=force_custom_plan (set on the pool)
# Postgres drops the `$n IS NULL` branches and uses the matching index. No index holds
# `status` (migration 007: status changes stay HOT updates); a status filter is put as the
# predicate of a partial index: a final status as `outcome` (the status, once final), an
# unfinished one ($12) as itself among `outcome IS NULL`, the few jobs not ended yet. A
# list by status walks those instead of every job looking for them (SUCCESS, most jobs,
# has no index of its own and is found soon enough that way). Not `status = $3` as well
# for a final status: Postgres would take the two for independent and expect too few
# rows to stop early.
_PAGE_WHERE = """
 WHERE ($1::text IS NULL OR organization = $1)
   AND ($2::text IS NULL OR environment = $2)
   AND ($3::text IS NULL OR CASE WHEN $12::bool THEN status = $3 ELSE outcome = $3 END)
   AND ($12::bool IS NOT TRUE OR outcome IS NULL)
   AND ($4::text IS NULL OR action = $4)
   AND ($5::text IS NULL OR module_type = $5)
   AND ($6::text IS NULL OR module_name = $6)
   AND ($7::text IS NULL OR build_id::text = $7
        OR lower(organization || ' ' || environment || ' ' || module_type || ' '
                 || module_name || ' ' || action) LIKE '%' || $8 || '%' ESCAPE '\\')
   AND ($9::bigint IS NULL OR build_id < $9)
   AND ($11::text[] IS NULL OR organization = ANY($11))
 ORDER BY build_id DESC
 LIMIT $10"""


def _as_text(name: str) -> str:
    # The contract's time format (services.common.timefmt.format_time), made by Postgres:
    # formatting four times per row in Python was a third of a list request's CPU.
    return f"""to_char({name} AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"') AS {name}"""


_PAGE_COLUMNS = ", ".join(_as_text(n) if n in _TIME_FIELDS else n for n in JOB_FIELDS)
# The watermark and the page in one statement, so in one round trip and one snapshot: the
# page reflects at least every event up to the watermark (ingestion commits both together).
_LIST_PAGE = f"""
WITH mark AS (
    SELECT coalesce(max(watermark), 0) AS watermark FROM ingest_progress WHERE kind = 'events'
)
SELECT mark.watermark, page.* FROM mark LEFT JOIN LATERAL (
    SELECT {_PAGE_COLUMNS}, variables FROM jobs {_PAGE_WHERE}
) page ON true
ORDER BY page.build_id DESC"""


async def init_connection(conn: asyncpg.Connection) -> None:
    """jsonb in and out as Python values (orjson)."""
    await conn.set_type_codec(
        "jsonb", encoder=codec.dumps_str, decoder=codec.loads, schema="pg_catalog"
    )


class PooledConnection(asyncpg.Connection):
    """A pooled connection released without asyncpg's reset query (advisory unlock, `CLOSE
    ALL`, `UNLISTEN *`, `RESET ALL`): one more round trip on every release, which py-spy
    put at about a tenth of the gateway's CPU at 20 jobs/s (ingestion releases one per
    batch). The gateway leaves no session state on a pooled connection to reset: no
    LISTEN, no session-level SET or advisory lock (the state backend's lock is taken per
    transaction, migrations use a connection of their own), no cursor outside a
    transaction. A transaction left open is still rolled back on release (asyncpg does
    that before the reset query)."""

    def get_reset_query(self) -> str:
        return ""


async def create_pool(database_url: str, **kwargs: Any) -> asyncpg.Pool:
    return await asyncpg.create_pool(
        database_url,
        init=init_connection,
        connection_class=PooledConnection,
        server_settings={"plan_cache_mode": "force_custom_plan"},
        **kwargs,
    )


def job_from_row(row: asyncpg.Record | Mapping[str, Any]) -> dict[str, Any]:
    """The contract's job object from a `jobs` row (plus `variables` when known)."""
    job = {name: row[name] for name in JOB_FIELDS}
    for name in _TIME_FIELDS:
        if job[name] is not None:
            job[name] = format_time(job[name])
    variables = row["variables"] if "variables" in row.keys() else None
    if variables is not None:
        job["variables"] = variables
    return job


def _like_escape(text: str) -> str:
    return text.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def list_params(
    flt: JobFilter, limit: int, before: int | None, scope: Sequence[str] | None = None
) -> tuple[Any, ...]:
    """The parameters of the list query for a filter: one more row than asked, so that
    `next` is set only when there are more. `scope` limits it to those organizations
    (None: every one; see services.gateway.auth.Principal.scope)."""
    q = flt.q or None  # an empty q matches everything, as in JobFilter.matches
    return (
        flt.organization,
        flt.environment,
        flt.status,
        flt.action,
        flt.module_type,
        flt.module_name,
        q,
        _like_escape(q) if q else None,
        before,
        limit + 1,
        None if scope is None else list(scope),
        flt.status is not None and not is_final(flt.status),
    )


async def watermark(pool: asyncpg.Pool | asyncpg.Connection, kind: str = "events") -> int:
    """The highest sequence of a stream (`kind` events or logs) whose whole prefix is stored
    (any gateway's)."""
    value = await pool.fetchval(
        "SELECT coalesce(max(watermark), 0) FROM ingest_progress WHERE kind = $1", kind
    )
    return int(value)


async def list_jobs(
    pool: asyncpg.Pool,
    flt: JobFilter,
    limit: int,
    before: int | None,
    scope: Sequence[str] | None = None,
) -> tuple[list[dict[str, Any]], int | None, int]:
    """(items newest first, `next` for paging, the watermark the items reflect)."""
    rows = await pool.fetch(_LIST_PAGE, *list_params(flt, limit, before, scope))
    mark = int(rows[0]["watermark"]) if rows else 0
    items = []
    for row in rows[:limit]:
        if row["build_id"] is None:
            break  # no jobs: the one row only carries the watermark
        job = {name: row[name] for name in JOB_FIELDS}
        if row["variables"] is not None:
            job["variables"] = row["variables"]
        items.append(job)
    next_before = items[-1]["build_id"] if len(rows) > limit else None
    return items, next_before, mark


async def get_job(
    pool: asyncpg.Pool, build_id: int, scope: Sequence[str] | None = None
) -> dict[str, Any] | None:
    """The job plus its `events` [{seq, status, at, reason, runner_id}…], or None (also
    when it belongs to an organization outside `scope`: its existence is not revealed)."""
    row = await pool.fetchrow(
        _SELECT_JOB + " WHERE build_id = $1 AND ($2::text[] IS NULL OR organization = ANY($2))",
        build_id,
        None if scope is None else list(scope),
    )
    if row is None:
        return None
    job = job_from_row(row)
    events = await pool.fetch(
        "SELECT seq, status, at, reason, runner_id, exit_code, queue_position FROM job_events"
        " WHERE build_id = $1 ORDER BY seq",
        build_id,
    )
    job["events"] = [
        {
            "seq": e["seq"],
            "status": e["status"],
            "at": format_time(e["at"]),
            "reason": e["reason"],
            "runner_id": e["runner_id"],
            "exit_code": e["exit_code"],
            "queue_position": e["queue_position"],
        }
        for e in events
    ]
    return job


async def job_visible(pool: asyncpg.Pool, build_id: int, scope: Sequence[str] | None) -> bool:
    """Whether the job is stored and belongs to an organization in `scope`."""
    found = await pool.fetchval(
        "SELECT 1 FROM jobs WHERE build_id = $1 AND ($2::text[] IS NULL OR organization = ANY($2))",
        build_id,
        None if scope is None else list(scope),
    )
    return found is not None


async def visible_build_ids(
    pool: asyncpg.Pool, build_ids: Sequence[int], scope: Sequence[str] | None
) -> set[int]:
    """Those of `build_ids` that are stored jobs of an organization in `scope`."""
    if not build_ids:
        return set()
    rows = await pool.fetch(
        "SELECT build_id FROM jobs WHERE build_id = ANY($1)"
        " AND ($2::text[] IS NULL OR organization = ANY($2))",
        list(build_ids),
        None if scope is None else list(scope),
    )
    return {r["build_id"] for r in rows}


async def read_log(pool: asyncpg.Pool, build_id: int, offset: int, limit: int) -> dict[str, Any]:
    """`{build_id, offset, next_offset, data, complete}` as GET …/logs answers it."""
    # One snapshot for both reads: read apart, the chunks could be read just before the
    # tail and its eof are stored and the state just after, so an empty page would say
    # `complete` while the log's tail is missing.
    async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
        chunks = await conn.fetch(
            'SELECT "offset", data FROM job_log_chunks WHERE build_id = $1'
            ' AND "offset" + size > $2 AND "offset" < $2 + $3 ORDER BY "offset"',
            build_id,
            offset,
            limit + 4,
        )
        state = await conn.fetchrow(
            "SELECT j.status, j.started_at, j.reason,"
            " EXISTS (SELECT 1 FROM job_log_chunks c WHERE c.build_id = j.build_id AND c.eof)"
            " AS eof FROM jobs j WHERE j.build_id = $1",
            build_id,
        )
    start, data = read_span(((c["offset"], c["data"]) for c in chunks), offset, limit)
    complete = False
    if state is not None and is_final(state["status"]):
        # Everything its runner published is stored: the eof chunk is in, or no runner
        # ever ran it, or its runner died and will publish nothing more.
        complete = bool(
            state["eof"] or state["started_at"] is None or state["reason"] == "runner-lost"
        )
    return {
        "build_id": build_id,
        "offset": start,
        "next_offset": start + len(data),
        "data": data.decode(),
        "complete": complete,
    }

"""Ingestion: status events and log chunks from JetStream into Postgres.

A durable pull consumer per gateway and stream; each fetched batch is written in ONE
transaction (jobs collapsed to the highest `seq` per build first, events keyed by
`event_id`, chunks by `(build_id, offset)`, all idempotent), committed, then acked. Nothing
is acked before it is stored; a redelivery is harmless. A malformed message is recorded in
`rejected_messages` in the same transaction, counted, then terminated: it never blocks.
If Postgres is down the batch is kept and retried until it is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError
from prometheus_client import Counter, Histogram

from services.common import schemas
from services.common.metrics import REJECTED
from services.common.timefmt import parse_time
from services.gateway.context import GatewayContext
from services.gateway.pull import Puller, stream_seq
from services.gateway.watermark import Contiguity

log = logging.getLogger(__name__)

BATCH = 1000
# Fetched but not yet acked, per consumer: a few batches in the pipeline.
MAX_ACK_PENDING = 20 * BATCH
# What a Postgres that went away looks like to asyncpg. InternalClientError too: a pooled
# connection that died mid-operation raises it on release ("cannot switch to state …"),
# and a batch that escaped this retry would wait out ack_wait (30 s), holding the
# watermark back all that time.
POSTGRES_AWAY = (
    OSError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
)
INGESTED = Counter("xoogify_ingested_total", "Messages stored by ingestion", ["kind"])
BATCH_SIZE = Histogram(
    "xoogify_ingest_batch_size",
    "Messages per ingested batch",
    ["kind"],
    buckets=(1, 10, 50, 100, 250, 500, 1000),
)

# Each batch is one statement per table: the rows travel as arrays (one per column) and
# `unnest` turns them back into rows, so Postgres plans and executes once per batch instead
# of once per row (executemany), which was most of the database's time.
_UPSERT_JOBS = """
INSERT INTO jobs (build_id, organization, environment, module_type, module_name, action,
                  status, reason, exit_code, runner_id, queue_position, seq, requested_by,
                  submitted_at, started_at, finished_at, updated_at, stream_seq, variables)
SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[], $5::text[],
                     $6::text[], $7::text[], $8::text[], $9::int[], $10::text[], $11::int[],
                     $12::int[], $13::text[], $14::timestamptz[], $15::timestamptz[],
                     $16::timestamptz[], $17::timestamptz[], $18::bigint[], $19::jsonb[])
ON CONFLICT (build_id) DO UPDATE SET
    status = EXCLUDED.status, reason = EXCLUDED.reason, exit_code = EXCLUDED.exit_code,
    runner_id = EXCLUDED.runner_id, queue_position = EXCLUDED.queue_position,
    seq = EXCLUDED.seq, started_at = EXCLUDED.started_at,
    finished_at = EXCLUDED.finished_at, updated_at = EXCLUDED.updated_at,
    stream_seq = EXCLUDED.stream_seq,
    variables = coalesce(EXCLUDED.variables, jobs.variables)
WHERE jobs.seq < EXCLUDED.seq
"""
# A batch may hold the same event twice (a redelivery): DO NOTHING skips the second.
_INSERT_EVENTS = """
INSERT INTO job_events (event_id, build_id, seq, status, at, reason, runner_id, exit_code,
                        queue_position, stream_seq, payload)
SELECT * FROM unnest($1::text[], $2::bigint[], $3::int[], $4::text[], $5::timestamptz[],
                     $6::text[], $7::text[], $8::int[], $9::int[], $10::bigint[],
                     $11::text[]::jsonb[])
ON CONFLICT (event_id) DO NOTHING
"""
_INSERT_CHUNKS = """
INSERT INTO job_log_chunks (build_id, "offset", size, data, eof)
SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::int[], $4::text[], $5::bool[])
ON CONFLICT (build_id, "offset") DO NOTHING
"""
_INSERT_REJECTED = """
INSERT INTO rejected_messages (subject, stream_seq, error, payload) VALUES ($1, $2, $3, $4)
"""
_SAVE_PROGRESS = """
INSERT INTO ingest_progress (consumer, kind, watermark) VALUES ($1, $2, $3)
ON CONFLICT (consumer) DO UPDATE SET watermark = greatest(ingest_progress.watermark,
    EXCLUDED.watermark), updated_at = now()
"""


@dataclass
class Decoded:
    stream_seq: int
    subject: str
    body: dict[str, Any] | None
    error: str | None
    raw: bytes


def _error_text(text: str) -> str:
    """An error as `rejected_messages.error` can hold it: bounded, and no NUL (Postgres text
    cannot store one; the error may quote the bad value)."""
    return text[:2000].replace("\x00", "\\u0000")


def _decode(msg: Msg, schema: str, check: Callable[[Msg, dict[str, Any]], str | None]) -> Decoded:
    seq = stream_seq(msg)
    try:
        body = schemas.decode(schema, msg.data)
    except schemas.SchemaError as exc:
        return Decoded(seq, msg.subject, None, _error_text(str(exc)), msg.data)
    problem = check(msg, body)
    if problem:
        return Decoded(seq, msg.subject, None, _error_text(problem), msg.data)
    return Decoded(seq, msg.subject, body, None, msg.data)


def _event_matches_subject(msg: Msg, body: dict[str, Any]) -> str | None:
    tokens = msg.subject.split(".")
    expected = [body["organization"], body["environment"], str(body["build_id"])]
    if tokens[-3:] != expected:
        return f"subject {msg.subject} does not match the event's organization/environment/build"
    if body["event_id"] != f"{body['build_id']}-{body['seq']}":
        return "event_id is not <build_id>-<seq>"
    return None


def _chunk_matches_subject(msg: Msg, body: dict[str, Any]) -> str | None:
    if msg.subject.rsplit(".", 1)[-1] != str(body["build_id"]):
        return f"subject {msg.subject} does not match build_id {body['build_id']}"
    return None


def _t(value: str | None) -> Any:
    return parse_time(value) if value else None


_FILL_VARIABLES = """
UPDATE jobs SET variables = v.variables
  FROM unnest($1::bigint[], $2::jsonb[]) AS v (build_id, variables)
 WHERE jobs.build_id = v.build_id AND jobs.variables IS NULL
"""


def columns(rows: Sequence[tuple[Any, ...]], width: int) -> list[list[Any]]:
    """Rows as one list per column: the parameters of an `unnest` statement."""
    if not rows:
        return [[] for _ in range(width)]
    return [list(column) for column in zip(*rows, strict=True)]


def event_rows(
    events: Sequence[Decoded],
) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """(job upserts collapsed to the highest seq per build, event inserts, variables fills).

    Only the first event of a job carries its variables; collapsing must not lose them,
    and a first event that arrives after later ones (a redelivery) still fills them in.
    """
    newest: dict[int, Decoded] = {}
    variables: dict[int, dict[str, str]] = {}
    inserts = []
    for d in events:
        assert d.body is not None
        e = d.body
        inserts.append(
            (
                e["event_id"],
                e["build_id"],
                e["seq"],
                e["status"],
                _t(e["updated_at"]),
                e["reason"],
                e["runner_id"],
                e["exit_code"],
                e["queue_position"],
                d.stream_seq,
                # The payload as received (validated JSON): cheaper to send as text than
                # to encode the parsed event again.
                d.raw.decode(),
            )
        )
        if e.get("variables") is not None:
            variables[e["build_id"]] = e["variables"]
        held = newest.get(e["build_id"])
        if held is None or held.body is None or held.body["seq"] < e["seq"]:
            newest[e["build_id"]] = d
    upserts = []
    for d in newest.values():
        assert d.body is not None
        e = d.body
        upserts.append(
            (
                e["build_id"],
                e["organization"],
                e["environment"],
                e["module_type"],
                e["module_name"],
                e["action"],
                e["status"],
                e["reason"],
                e["exit_code"],
                e["runner_id"],
                e["queue_position"],
                e["seq"],
                e["requested_by"],
                _t(e["submitted_at"]),
                _t(e["started_at"]),
                _t(e["finished_at"]),
                _t(e["updated_at"]),
                d.stream_seq,
                variables.get(e["build_id"]),
            )
        )
    return upserts, inserts, list(variables.items())


class Ingestor:
    """One consumer → Postgres loop (kind "events" or "logs")."""

    def __init__(self, ctx: GatewayContext, kind: str) -> None:
        self.ctx = ctx
        self.kind = kind
        subjects = ctx.settings.subjects
        if kind == "events":
            self.stream, self.subject = subjects.events_stream, subjects.events_filter()
            self.schema, self.check = "job_event", _event_matches_subject
        else:
            self.stream, self.subject = subjects.logs_stream, subjects.logs_all
            self.schema, self.check = "log_chunk", _chunk_matches_subject
        self.consumer = f"ingest-{kind}-{ctx.gateway_id}"
        self.progress = Contiguity()
        self._stopping = asyncio.Event()

    async def _subscribe(self, fresh: bool) -> Puller:
        if fresh:
            # Start over just after the stored watermark. Messages a killed predecessor
            # fetched but never acked would otherwise come back only after ack_wait,
            # holding the watermark back that long; re-reading a few is harmless.
            with contextlib.suppress(NotFoundError):
                await self.ctx.js.delete_consumer(self.stream, self.consumer)
        config = ConsumerConfig(
            durable_name=self.consumer,
            filter_subject=self.subject,
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=self.progress.watermark + 1,
            ack_wait=30,
            max_ack_pending=MAX_ACK_PENDING,
        )
        try:
            await self.ctx.js.consumer_info(self.stream, self.consumer)
        except NotFoundError:
            await self.ctx.js.add_consumer(self.stream, config)
        puller = Puller(self.ctx.nc, self.stream, self.consumer)
        await puller.start()
        return puller

    async def _load_progress(self) -> None:
        while not self._stopping.is_set():
            try:
                mark = await self.ctx.pool.fetchval(
                    "SELECT watermark FROM ingest_progress WHERE consumer = $1", self.consumer
                )
                self.progress = Contiguity(int(mark or 0))
                return
            except POSTGRES_AWAY as exc:
                log.warning("waiting for postgres", extra={"error": repr(exc)})
                await asyncio.sleep(1)

    async def run(self) -> None:
        """Fetch → decode → store → ack, with the next batch fetched and decoded while the
        previous one is being stored (stores stay one at a time, in order)."""
        await self._load_progress()
        puller: Puller | None = None
        fresh = True
        storing: asyncio.Task[None] | None = None
        try:
            while not self._stopping.is_set():
                try:
                    if puller is None:
                        puller = await self._subscribe(fresh)
                        fresh = False
                    msgs = await puller.fetch(BATCH, timeout=0.5)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # NATS down or restarting: try again shortly
                    log.warning(
                        "ingest fetch failed", extra={"kind": self.kind, "error": repr(exc)}
                    )
                    if puller is not None:
                        await puller.stop()
                    puller = None
                    await asyncio.sleep(0.5)
                    continue
                if not msgs:
                    continue
                decoded = [_decode(m, self.schema, self.check) for m in msgs]
                if storing is not None:
                    await storing
                storing = asyncio.create_task(self._store_batch(msgs, decoded))
        finally:
            if storing is not None:
                # Let a batch in hand finish its transaction and acks.
                with contextlib.suppress(Exception):
                    await storing
            # A subscription left open makes the connection's drain wait it out.
            if puller is not None:
                await puller.stop()

    async def _store_batch(self, msgs: list[Msg], decoded: list[Decoded]) -> None:
        try:
            await self._store_until_done(msgs, decoded)
        except asyncio.CancelledError:
            raise
        except Exception:
            # A bug must not end ingestion: the batch stays unacked, comes back after
            # ack_wait, and everything else goes on.
            log.exception("ingest batch failed", extra={"kind": self.kind})
            await asyncio.sleep(1)

    async def _store_until_done(self, msgs: list[Msg], decoded: list[Decoded]) -> None:
        delay = 0.2
        while True:
            try:
                await self._store(decoded)
                break
            except asyncpg.DataError:
                # A value Postgres cannot store (a NUL in text, …): retrying the batch would
                # block the stream for good. Find the culprits and reject them instead.
                await self._store_one_by_one(decoded)
                break
            except POSTGRES_AWAY as exc:
                # Postgres is away: keep the batch (tell JetStream we are still on it).
                log.warning("ingest store failed; retrying", extra={"error": repr(exc)})
                for m in msgs:
                    with contextlib.suppress(Exception):
                        await m.in_progress()
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        # Committed: now, and only now, the acks (and the terms of what was rejected).
        rejected = 0
        for m, d in zip(msgs, decoded, strict=True):
            with contextlib.suppress(Exception):
                if d.error is None:
                    await m.ack()
                else:
                    rejected += 1
                    await m.term()
        if rejected:
            for d in decoded:
                if d.error is not None:
                    REJECTED.labels("gateway", self.subject).inc()
                    log.warning(
                        "message rejected",
                        extra={"subject": d.subject, "stream_seq": d.stream_seq, "error": d.error},
                    )
        BATCH_SIZE.labels(self.kind).observe(len(msgs))
        INGESTED.labels(self.kind).inc(len(msgs) - rejected)

    async def _store_one_by_one(self, decoded: list[Decoded]) -> None:
        """Store each message alone; one that Postgres refuses is recorded as rejected (in
        `decoded`, so the caller terminates it rather than acking it)."""
        for i, d in enumerate(decoded):
            try:
                await self._store([d])
            except asyncpg.DataError as exc:
                decoded[i] = Decoded(
                    d.stream_seq, d.subject, None, _error_text(f"not storable: {exc}"), d.raw
                )
                await self._store([decoded[i]])

    async def _store(self, decoded: list[Decoded]) -> None:
        good = [d for d in decoded if d.error is None]
        bad = [d for d in decoded if d.error is not None]
        # Advance a copy; it becomes ours only once the transaction has committed.
        progress = self.progress.copy()
        mark = progress.add(d.stream_seq for d in decoded)
        if (
            self.kind == "events"
            and progress.waiting
            and min(d.stream_seq for d in decoded) > mark + 1
        ):
            # Maybe the stream dropped old messages (retention): they will never come.
            info = await self.ctx.js.stream_info(self.stream)
            mark = progress.skip_to(info.state.first_seq)
        async with self.ctx.pool.acquire() as conn, conn.transaction():
            if self.kind == "events" and good:
                upserts, inserts, fills = event_rows(good)
                await conn.execute(_INSERT_EVENTS, *columns(inserts, 11))
                await conn.execute(_UPSERT_JOBS, *columns(upserts, 19))
                if fills:
                    await conn.execute(_FILL_VARIABLES, *columns(fills, 2))
            elif good:
                rows = []
                for d in good:
                    assert d.body is not None
                    b = d.body
                    rows.append(
                        (b["build_id"], b["offset"], len(b["data"].encode()), b["data"], b["eof"])
                    )
                await conn.execute(_INSERT_CHUNKS, *columns(rows, 5))
            if bad:
                await conn.executemany(
                    _INSERT_REJECTED, [(d.subject, d.stream_seq, d.error, d.raw) for d in bad]
                )
            await conn.execute(_SAVE_PROGRESS, self.consumer, self.kind, mark)
        self.progress = progress

    def stop(self) -> None:
        self._stopping.set()

"""Ingestion: status events and log chunks from JetStream into Postgres.

A durable pull consumer per gateway and stream; each fetched batch is written in ONE
transaction (jobs collapsed to the highest `seq` per build first, events keyed by
`event_id`, chunks by `(build_id, offset)`, all idempotent), committed, then acked with one
ack for the whole batch. Nothing is acked before it is stored; a redelivery is harmless. A
malformed message is recorded in `rejected_messages` in the same transaction, counted, then
terminated: it never blocks. If Postgres is down the batch is kept and retried until it is
back. docs/internals.md ("Ingestion") says why one ack per batch is safe.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
from asyncpg.pool import PoolConnectionProxy
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError
from prometheus_client import Counter, Histogram

from services.common import schemas
from services.common.metrics import REJECTED
from services.common.pull import ACK, IN_PROGRESS, TERM, Delivery, PullReader, reply_stream_seq
from services.gateway.context import GatewayContext
from services.gateway.watermark import Contiguity

log = logging.getLogger(__name__)

BATCH = 1000
# Fetched but not yet acked, per consumer: a few batches in the pipeline.
MAX_ACK_PENDING = 20 * BATCH
# How long a fetch waits when nothing is delivered (and a pull request lives).
FETCH_WAIT_S = 0.5
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

# A batch of events is one statement: the payloads travel as received with their stream
# sequences, and Postgres parses each once (it stores it as jsonb anyway) and takes the
# columns from it. Building 30 typed arrays in Python and encoding them with asyncpg cost
# more than half of the gateway's CPU per event; Postgres does the same work in C for less
# than it saves in decoding binary parameters. The payloads go as ONE bytea, separated by
# RS (0x1E, as in RFC 7464 JSON text sequences): asyncpg spends 0.7 us per element of a
# bytea[] or text[] (an ABC isinstance check each), ten times the cost of copying them.
# Valid JSON never holds a raw control character (`_decode` refuses one anyway).
# `jsonb_to_record` reads values as Postgres would read them as text: a value the schema
# lets through but a column cannot hold (a time like 2026-13-45, a number out of range) is
# a DataError, and the batch is then stored one by one so that message alone is rejected.
# The job row comes from the batch's newest event per build (an INSERT … ON CONFLICT may
# not touch a row twice) and never replaces a newer one; a batch may hold the same event
# twice (a redelivery): DO NOTHING skips the second.
# The statements are in migration 008 (services/gateway/sql/migrations), as two functions
# so that a batch is one round trip: the events' store, then the fill described below,
# then the watermark; or the chunks' insert, then the watermark.
# Only the first event of a job carries its variables. When it was not the one that went
# into the job row (a later event was stored first, or is newer in the same batch), the
# variables come from the stored event, after the upsert (`p_fill`: the builds to fill).
_STORE_EVENTS = "SELECT xoogify_ingest_events($1::bigint[], $2, $3::bigint[], $4, $5, $6)"
_STORE_CHUNKS = """
SELECT xoogify_ingest_chunks($1::bigint[], $2::bigint[], $3::int[], $4::text[], $5::bool[],
                             $6, $7, $8)
"""
_INSERT_REJECTED = """
INSERT INTO rejected_messages (subject, stream_seq, error, payload) VALUES ($1, $2, $3, $4)
"""
# Separates the payloads of a batch on their way to Postgres (see above).
RS = b"\x1e"


@dataclass(slots=True)
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


Check = Callable[[str, dict[str, Any]], "str | None"]


def _decode(msg: Delivery, schema: str, check: Check) -> Decoded:
    seq = reply_stream_seq(msg.reply)
    if RS in msg.data:
        # Not JSON (a raw control character); refused here too, as it would cut the batch.
        return Decoded(seq, msg.subject, None, "a raw RS (0x1E) byte: not JSON", msg.data)
    try:
        body = schemas.decode(schema, msg.data)
    except schemas.SchemaError as exc:
        return Decoded(seq, msg.subject, None, _error_text(str(exc)), msg.data)
    problem = check(msg.subject, body)
    if problem:
        return Decoded(seq, msg.subject, None, _error_text(problem), msg.data)
    return Decoded(seq, msg.subject, body, None, msg.data)


def _event_matches_subject(subject: str, body: dict[str, Any]) -> str | None:
    # The schema keeps dots out of organization and environment, so the suffix is exactly
    # the last three tokens (cheaper than splitting the subject).
    if not subject.endswith(f".{body['organization']}.{body['environment']}.{body['build_id']}"):
        return f"subject {subject} does not match the event's organization/environment/build"
    if body["event_id"] != f"{body['build_id']}-{body['seq']}":
        return "event_id is not <build_id>-<seq>"
    return None


def _chunk_matches_subject(subject: str, body: dict[str, Any]) -> str | None:
    if subject.rsplit(".", 1)[-1] != str(body["build_id"]):
        return f"subject {subject} does not match build_id {body['build_id']}"
    return None


def columns(rows: Sequence[tuple[Any, ...]], width: int) -> list[list[Any]]:
    """Rows as one list per column: the parameters of an `unnest` statement."""
    if not rows:
        return [[] for _ in range(width)]
    return [list(column) for column in zip(*rows, strict=True)]


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
        self._conn: PoolConnectionProxy[Any] | None = None
        # Which consumer (recreated by each _subscribe) delivered a batch: its ack goes only
        # to that one (an ack-all to a newer consumer of the same name could cover
        # messages that consumer handed over and are not stored yet).
        self._generation = 0

    async def _subscribe(self) -> PullReader:
        # Always start over just after the stored watermark, with a new consumer: messages
        # a killed predecessor (or a reader given up after a NATS error) was handed but
        # never stored would otherwise come back only after ack_wait, holding the
        # watermark back that long, and with acks covering everything up to a sequence
        # (below) they must never be left pending behind stored ones. Re-reading a few
        # is harmless.
        self._generation += 1
        with contextlib.suppress(NotFoundError):
            await self.ctx.js.delete_consumer(self.stream, self.consumer)
        config = ConsumerConfig(
            durable_name=self.consumer,
            filter_subject=self.subject,
            # One ack per batch, for its highest stream sequence, covers the whole batch:
            # one publish here and one ack for NATS to process instead of a thousand
            # (about 5 us of CPU per event between the gateway and nats-server). Safe
            # because every message up to that sequence that this consumer handed over
            # is stored by then: first deliveries come in stream order, batches are
            # stored in order, a batch is retried until stored (never skipped), and a
            # batch is acked only to the consumer that delivered it (`_generation`).
            ack_policy=AckPolicy.ALL,
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=self.progress.watermark + 1,
            ack_wait=30,
            max_ack_pending=MAX_ACK_PENDING,
        )
        await self.ctx.js.add_consumer(self.stream, config)
        puller = PullReader(
            self.ctx.nc, self.stream, self.consumer, batch=BATCH, expires_s=FETCH_WAIT_S
        )
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
        puller: PullReader | None = None
        generation = 0
        storing: asyncio.Task[None] | None = None
        try:
            while not self._stopping.is_set():
                try:
                    if puller is None:
                        puller = await self._subscribe()
                        generation = self._generation
                    msgs = await puller.fetch(timeout=FETCH_WAIT_S)
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
                storing = asyncio.create_task(self._store_batch(msgs, decoded, generation))
        finally:
            if storing is not None:
                # Let a batch in hand finish its transaction and acks.
                with contextlib.suppress(Exception):
                    await storing
            # A subscription left open makes the connection's drain wait it out.
            if puller is not None:
                await puller.stop()
            # The pool's close waits for every connection taken from it.
            await self._drop_connection()

    async def _reply(self, msg: Delivery, payload: bytes) -> None:
        # Sent as given, not through `Delivery`'s calls, which send one final reply per
        # message: the batch's top message may be termed (rejected) and must still get
        # the ack that covers the whole batch (ack policy all).
        await self.ctx.nc.publish(msg.reply, payload)

    async def _keep(self, msgs: list[Delivery], delay: float, cap: float) -> float:
        """Keep a batch that could not be stored yet: tell JetStream we are still on it,
        wait `delay`, and return the next (doubled, at most `cap`)."""
        for m in msgs:
            with contextlib.suppress(Exception):
                await self._reply(m, IN_PROGRESS)
        await asyncio.sleep(delay)
        return min(delay * 2, cap)

    async def _store_batch(
        self, msgs: list[Delivery], decoded: list[Decoded], generation: int
    ) -> None:
        delay = 1.0
        while True:
            try:
                await self._store_until_done(msgs, decoded, generation)
                return
            except asyncio.CancelledError:
                raise
            except Exception:
                # A bug must not end ingestion, nor may the batch be skipped: a later
                # batch's ack would cover it. It is tried again (loudly) until stored or
                # the gateway stops; unacked, it is then read again at the next start.
                log.exception("ingest batch failed; retrying", extra={"kind": self.kind})
                if self._stopping.is_set():
                    return
                delay = await self._keep(msgs, delay, cap=30.0)

    async def _store_until_done(
        self, msgs: list[Delivery], decoded: list[Decoded], generation: int
    ) -> None:
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
                if self._stopping.is_set():
                    return  # unacked: read again from the watermark at the next start
                # Postgres is away: keep the batch (tell JetStream we are still on it).
                log.warning("ingest store failed; retrying", extra={"error": repr(exc)})
                delay = await self._keep(msgs, delay, cap=5.0)
        # Committed: now, and only now, the terms of what was rejected and the ack of the
        # batch (its highest stream sequence: the consumer acks everything up to it).
        rejected = 0
        if generation == self._generation:
            for m, d in zip(msgs, decoded, strict=True):
                if d.error is not None:
                    rejected += 1
                    with contextlib.suppress(Exception):
                        await self._reply(m, TERM)
            top = max(zip(decoded, msgs, strict=True), key=lambda pair: pair[0].stream_seq)[1]
            with contextlib.suppress(Exception):
                await self._reply(top, ACK)
        else:
            # Its consumer was replaced meanwhile; the new one reads it again from the
            # watermark (storing it again is harmless).
            rejected = sum(1 for d in decoded if d.error is not None)
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
        args: tuple[Any, ...]
        if self.kind == "events":
            fill = [d.body["build_id"] for d in good if d.body and "variables" in d.body]
            payloads = RS.join([d.raw for d in good])
            seqs = [d.stream_seq for d in good]
            statement, args = _STORE_EVENTS, (seqs, payloads, fill)
        else:
            rows = []
            for d in good:
                assert d.body is not None
                b = d.body
                rows.append(
                    (b["build_id"], b["offset"], len(b["data"].encode()), b["data"], b["eof"])
                )
            statement, args = _STORE_CHUNKS, tuple(columns(rows, 5))
        conn = await self._connection()
        try:
            if bad:
                async with conn.transaction():
                    await conn.executemany(
                        _INSERT_REJECTED, [(d.subject, d.stream_seq, d.error, d.raw) for d in bad]
                    )
                    await conn.execute(statement, *args, self.consumer, self.kind, mark)
            else:
                # One statement: atomic on its own, no BEGIN/COMMIT round trips.
                await conn.execute(statement, *args, self.consumer, self.kind, mark)
        except BaseException:
            await self._drop_connection()
            raise
        self.progress = progress

    async def _connection(self) -> PoolConnectionProxy[Any]:
        """The ingestor's own connection, kept from batch to batch: taking one from the
        pool and giving it back cost 5-6 % of the gateway's CPU at 20 jobs/s (py-spy), where
        each event is a batch of its own."""
        if self._conn is None:
            self._conn = await self.ctx.pool.acquire()
        return self._conn

    async def _drop_connection(self) -> None:
        """Give the connection back after a failure (it may be broken: the pool checks it,
        and the next batch takes another), or at the end."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        try:
            await asyncio.wait_for(self.ctx.pool.release(conn), 5)
        except Exception:  # the pool's close must not wait for it
            conn.terminate()

    def stop(self) -> None:
        self._stopping.set()

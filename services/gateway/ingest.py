"""Ingestion: status events and log chunks from JetStream into Postgres.

A durable pull consumer per gateway and stream; each fetched batch is written in ONE
transaction (jobs collapsed to the highest `seq` per build first, events keyed by
`event_id`, chunks by `(build_id, offset)`, all idempotent), committed, then acked with one
ack for the whole batch. Two event batches may be in their transactions at once (on two
connections); acks go out in the order the batches were read. Nothing is acked before it
and everything read before it are stored; a redelivery is harmless. A malformed message is
recorded in `rejected_messages` in the same transaction, counted, then terminated: it never
blocks. If Postgres is down the batch is kept and retried until it is back.
docs/internals.md ("Ingestion") says why one ack per batch is safe.
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
from services.gateway.landing import InOrder
from services.gateway.watermark import Contiguity

log = logging.getLogger(__name__)

BATCH = 1000
# Event batches stored at once, each in its own transaction (see Ingestor.__init__).
STORES = 2
# Only batches of at least this many messages are stored beside another.
BESIDE_FROM = 100
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
_SAVE_PROGRESS = "SELECT xoogify_save_progress($1, $2, $3)"
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


@dataclass(slots=True, eq=False)
class _Batch:
    msgs: list[Delivery]
    decoded: list[Decoded]
    generation: int  # of the consumer that delivered it (see Ingestor._generation)


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
        # Batches stored at once: one Postgres backend storing batch after batch was the
        # bottleneck of a backlog (about 80 % of a core, the gateway waiting on it, the
        # other core mostly idle). Logs stay one at a time: a follower reading Postgres
        # must never see a later chunk of a job without the earlier ones.
        self.stores = STORES if kind == "events" else 1
        self.linger_s = ctx.settings.ingest_linger_s
        self._storing: set[asyncio.Task[None]] = set()
        self._landing: InOrder[_Batch] = InOrder()
        # The stream sequences of each batch in a transaction now.
        self._in_store: list[list[int]] = []
        # Connections kept between batches; the highest watermark a batch has saved.
        self._idle: list[PoolConnectionProxy[Any]] = []
        self._saved = 0
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
            # acked in the order they were read (`InOrder`), a batch is retried until
            # stored (never skipped), and a batch is acked only to the consumer that
            # delivered it (`_generation`).
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
                self._saved = self.progress.watermark
                return
            except POSTGRES_AWAY as exc:
                log.warning("waiting for postgres", extra={"error": repr(exc)})
                await asyncio.sleep(1)

    async def run(self) -> None:
        """Fetch → decode → store → ack, with the next batches fetched and decoded while
        earlier ones are being stored (`self.stores` at once, acked in order)."""
        await self._load_progress()
        puller: PullReader | None = None
        generation = 0
        try:
            while not self._stopping.is_set():
                try:
                    if puller is None:
                        # A new consumer reads again from the watermark: nothing it delivers
                        # may still be on its way into Postgres under the old one (the same
                        # events in two transactions at once could deadlock).
                        await self._drain()
                        puller = await self._subscribe()
                        generation = self._generation
                    msgs = await puller.fetch(timeout=FETCH_WAIT_S)
                    if msgs and len(msgs) < BATCH and self.linger_s > 0:
                        msgs += await self._linger(puller, len(msgs))
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
                batch = _Batch(
                    msgs, [_decode(m, self.schema, self.check) for m in msgs], generation
                )
                # A small batch (a low rate) waits for the one being stored: beside it, it
                # would save no time, and could not count itself in its watermark (one
                # more commit to catch that up, measured at 20 jobs/s).
                limit = self.stores if len(msgs) >= BESIDE_FROM else 1
                while len(self._storing) >= limit:
                    await asyncio.wait(self._storing, return_when=asyncio.FIRST_COMPLETED)
                self._landing.start(batch)
                task = asyncio.create_task(self._store_batch(batch))
                self._storing.add(task)
                task.add_done_callback(self._storing.discard)
        finally:
            # Let the batches in hand finish their transactions and acks.
            await self._drain()
            # A subscription left open makes the connection's drain wait it out.
            if puller is not None:
                await puller.stop()
            # The pool's close waits for every connection taken from it.
            await self._drop_connections()

    async def _linger(self, puller: PullReader, have: int) -> list[Delivery]:
        """What else arrives within the linger (`XOOGIFY_INGEST_LINGER_S`) after a batch
        that is not full: at a low rate, a job's events, seconds apart in its life but
        milliseconds apart here, go in one transaction instead of one each. Measured at 20
        jobs/s (bench latency): Postgres CPU per job 1.75-2.15 -> 1.2-1.3 ms, and with it
        the job's own latency, as that work no longer shares the two cores with the job
        while it runs."""
        more: list[Delivery] = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.linger_s
        while have + len(more) < BATCH and (left := deadline - loop.time()) > 0:
            got = await puller.fetch(timeout=left)
            if not got:
                break
            more += got
        return more

    async def _drain(self) -> None:
        if self._storing:
            await asyncio.gather(*self._storing, return_exceptions=True)

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

    async def _store_batch(self, batch: _Batch) -> None:
        delay = 1.0
        while True:
            try:
                if await self._store_until_done(batch):
                    await self._acknowledge(self._landing.land(batch))
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
                delay = await self._keep(batch.msgs, delay, cap=30.0)

    async def _store_until_done(self, batch: _Batch) -> bool:
        """Store the batch, waiting out a Postgres that is away; False if the gateway
        stopped first (the batch stays unacked)."""
        delay = 0.2
        while True:
            try:
                await self._store(batch.decoded)
                return True
            except asyncpg.DataError:
                # A value Postgres cannot store (a NUL in text, …): retrying the batch would
                # block the stream for good. Find the culprits and reject them instead.
                await self._store_one_by_one(batch.decoded)
                return True
            except POSTGRES_AWAY as exc:
                if self._stopping.is_set():
                    return False  # unacked: read again from the watermark at the next start
                # Postgres is away: keep the batch (tell JetStream we are still on it).
                log.warning("ingest store failed; retrying", extra={"error": repr(exc)})
                delay = await self._keep(batch.msgs, delay, cap=5.0)

    async def _acknowledge(self, ready: list[_Batch]) -> None:
        """Batches stored, with every batch read before them: now, and only now, the terms
        of what was rejected and one ack (the highest stream sequence of the last of them
        from the current consumer: the consumer acks everything up to it)."""
        top: Delivery | None = None
        for batch in ready:
            current = batch.generation == self._generation
            rejected = 0
            for m, d in zip(batch.msgs, batch.decoded, strict=True):
                if d.error is None:
                    continue
                rejected += 1
                REJECTED.labels("gateway", self.subject).inc()
                log.warning(
                    "message rejected",
                    extra={"subject": d.subject, "stream_seq": d.stream_seq, "error": d.error},
                )
                # A batch whose consumer was replaced meanwhile gets no reply: the new one
                # reads it again from the watermark (storing it again is harmless).
                if current:
                    with contextlib.suppress(Exception):
                        await self._reply(m, TERM)
            if current:
                top = max(
                    zip(batch.decoded, batch.msgs, strict=True), key=lambda p: p[0].stream_seq
                )[1]
            BATCH_SIZE.labels(self.kind).observe(len(batch.msgs))
            INGESTED.labels(self.kind).inc(len(batch.msgs) - rejected)
        if top is not None:
            with contextlib.suppress(Exception):
                await self._reply(top, ACK)

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
        """Store one batch in one transaction on a connection of its own, and advance
        `progress` once it has committed."""
        good = [d for d in decoded if d.error is None]
        bad = [d for d in decoded if d.error is not None]
        own = [d.stream_seq for d in decoded]
        # The watermark saved with the batch counts only what has committed and the batch
        # itself, never a batch still being stored beside it (it may yet fail).
        progress = self.progress.copy()
        mark = progress.add(own)
        skip_to = None
        if self.kind == "events" and mark + 1 < min(own):
            expected = progress.copy()
            for seqs in self._in_store:
                expected.add(seqs)
            if expected.watermark + 1 < min(own):
                # A hole that no batch in hand fills: maybe the stream dropped old
                # messages (retention), and they will never come.
                skip_to = (await self.ctx.js.stream_info(self.stream)).state.first_seq
                mark = progress.skip_to(skip_to)
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
        self._in_store.append(own)
        try:
            conn = await self._connection()
            try:
                if bad:
                    async with conn.transaction():
                        await conn.executemany(
                            _INSERT_REJECTED,
                            [(d.subject, d.stream_seq, d.error, d.raw) for d in bad],
                        )
                        await conn.execute(statement, *args, self.consumer, self.kind, mark)
                else:
                    # One statement: atomic on its own, no BEGIN/COMMIT round trips.
                    await conn.execute(statement, *args, self.consumer, self.kind, mark)
            except BaseException:
                await self._drop(conn)
                raise
            self.progress.add(own)
            if skip_to is not None:
                self.progress.skip_to(skip_to)
            self._saved = max(self._saved, mark)
        finally:
            self._in_store.remove(own)
        if await self._catch_up(conn):
            self._idle.append(conn)

    async def _catch_up(self, conn: PoolConnectionProxy[Any]) -> bool:
        """With nothing else being stored, save the watermark if the batches' own marks
        fell short of it: a batch that committed while an earlier one was still being
        stored could not count itself. Under a steady flow the next batch carries it.
        False if the connection failed (and was given back)."""
        if self._in_store or self.progress.watermark <= self._saved:
            return True
        mark = self.progress.watermark
        try:
            await conn.execute(_SAVE_PROGRESS, self.consumer, self.kind, mark)
        except BaseException as exc:
            await self._drop(conn)
            if not isinstance(exc, POSTGRES_AWAY):
                raise
            # The batch is stored; the next one carries the watermark.
            log.warning("ingest watermark not saved", extra={"error": repr(exc)})
            return False
        self._saved = max(self._saved, mark)
        return True

    async def _connection(self) -> PoolConnectionProxy[Any]:
        """A connection the ingestor keeps from batch to batch, one per batch being stored:
        taking one from the pool and giving it back cost 5-6 % of the gateway's CPU at 20
        jobs/s (py-spy), where each event is a batch of its own."""
        if self._idle:
            return self._idle.pop()
        return await self.ctx.pool.acquire()

    async def _drop(self, conn: PoolConnectionProxy[Any]) -> None:
        """Give a connection back to the pool: after a failure (it may be broken: the pool
        checks it, and the next batch takes another), or at the end."""
        try:
            await asyncio.wait_for(self.ctx.pool.release(conn), 5)
        except Exception:  # the pool's close must not wait for it
            conn.terminate()

    async def _drop_connections(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            await self._drop(conn)

    def stop(self) -> None:
        self._stopping.set()

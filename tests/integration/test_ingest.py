"""Ingestion against real NATS and Postgres: events and log chunks stored once each,
never moving a job backwards; malformed messages recorded and skipped; the watermark."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import asyncpg
import httpx
import pytest

from services.common import codec
from services.common.config import Settings
from services.common.embedded import EmbeddedNats
from services.common.pull import ACK, reply_stream_seq
from services.gateway import ingest
from services.gateway.context import GatewayContext
from services.gateway.ingest import Decoded, Ingestor
from tests.integration.ws_support import job_event, publisher, serve_gateway
from tests.support import auth_headers, eventually


async def fetchval(settings: Settings, sql: str, *args: Any) -> Any:
    conn = await asyncpg.connect(settings.database_url)
    try:
        return await conn.fetchval(sql, *args)
    finally:
        await conn.close()


async def wait_events(settings: Settings, count: int) -> None:
    async def enough() -> bool:
        return bool(await fetchval(settings, "SELECT count(*) FROM job_events") >= count)

    await eventually(enough, timeout=15)


async def test_events_are_stored_once_and_never_move_a_job_back(settings: Settings) -> None:
    async with publisher(settings) as pub, serve_gateway(settings) as gw:
        await pub.event(job_event(1, 1))
        await pub.event(job_event(1, 3, "SUCCESS"))
        await pub.event(job_event(1, 2, "WORKING"))  # late
        # A redelivery as a new message (other Nats-Msg-Id would not be deduplicated).
        subject = settings.subjects.event("acme", "stg", 1)
        await pub.js.publish(subject, codec.dumps(job_event(1, 2, "WORKING")))
        last = await pub.last_seq()
        async with httpx.AsyncClient(base_url=gw.url, headers=auth_headers(settings)) as client:

            async def caught_up() -> dict[str, Any] | None:
                body = (await client.get("/api/jobs")).json()
                return body if body["watermark"] >= last else None

            listing = await eventually(caught_up, timeout=15)
            job = (await client.get("/api/jobs/1")).json()
        assert [j["build_id"] for j in listing["items"]] == [1]
        # The list (times formatted by Postgres) and the job (by Python) agree exactly.
        assert listing["items"][0] == {k: v for k, v in job.items() if k != "events"}
        assert job["status"] == "SUCCESS" and job["seq"] == 3
        assert job["finished_at"] == "2026-11-24T07:00:00.123Z"
        assert [(e["seq"], e["status"]) for e in job["events"]] == [
            (1, "IN-PROGRESS"),
            (2, "WORKING"),
            (3, "SUCCESS"),
        ]
    assert await fetchval(settings, "SELECT count(*) FROM job_events") == 3


async def test_log_chunks_are_stored_and_read_back_by_offset(settings: Settings) -> None:
    text = "héllo\nwörld 😀\n"
    data = text.encode()
    async with publisher(settings) as pub, serve_gateway(settings) as gw:
        await pub.event(job_event(4, 1))
        await pub.event(job_event(4, 2, "WORKING"))
        await pub.chunk(4, 0, "héllo\n")
        await pub.chunk(4, 0, "héllo\n")  # a redelivered chunk
        await pub.chunk(4, len("héllo\n".encode()), "wörld 😀\n")
        async with httpx.AsyncClient(base_url=gw.url, headers=auth_headers(settings)) as client:

            async def stored() -> dict[str, Any] | None:
                r = await client.get("/api/jobs/4/logs")  # 404 until the job is stored
                body = r.json()
                return body if r.status_code == 200 and body["next_offset"] == len(data) else None

            whole = await eventually(stored, timeout=15)
            assert whole == {
                "build_id": 4,
                "offset": 0,
                "next_offset": len(data),
                "data": text,
                "complete": False,  # not final yet
            }
            part = (await client.get("/api/jobs/4/logs", params={"offset": 2, "limit": 5})).json()
            # Offset 2 is inside "é": the answer starts after it and cuts before "\nw"…
            assert part["offset"] == 3 and part["data"] == "llo\nw"
            assert part["next_offset"] == 8
            tail = (await client.get("/api/jobs/4/logs", params={"offset": len(data)})).json()
            assert tail["data"] == "" and tail["next_offset"] == len(data)

            await pub.chunk(4, len(data), "", eof=True)
            await pub.event(job_event(4, 3, "SUCCESS"))

            async def complete() -> bool:
                body = (await client.get("/api/jobs/4/logs")).json()
                return bool(body["complete"])

            await eventually(complete, timeout=15)
            missing = await client.get("/api/jobs/999/logs")
            assert missing.status_code == 404
    assert await fetchval(settings, "SELECT count(*) FROM job_log_chunks") == 3


async def test_malformed_messages_are_recorded_and_later_ones_stored(settings: Settings) -> None:
    async with publisher(settings) as pub, serve_gateway(settings):
        subjects = settings.subjects
        await pub.js.publish(subjects.event("acme", "stg", 2), b"{not json")
        await pub.js.publish(subjects.event("acme", "stg", 2), codec.dumps({"build_id": 2}))
        # Valid on its own but published on another build's subject.
        await pub.js.publish(subjects.event("acme", "stg", 3), codec.dumps(job_event(2, 1)))
        await pub.js.publish(subjects.log(2), b"\xff\xfe")
        await pub.js.publish(subjects.log(2), codec.dumps({"build_id": 2, "offset": -1}))
        await pub.event(job_event(2, 1))
        await pub.chunk(2, 0, "ok\n")
        last = await pub.last_seq()

        async def stored() -> bool:
            chunks = await fetchval(settings, "SELECT count(*) FROM job_log_chunks")
            return bool(
                chunks == 1
                and await fetchval(
                    settings, "SELECT max(watermark) FROM ingest_progress WHERE kind = 'events'"
                )
                == last
            )

        await eventually(stored, timeout=15)
    assert await fetchval(settings, "SELECT count(*) FROM rejected_messages") == 5
    assert (
        await fetchval(
            settings, "SELECT count(*) FROM rejected_messages WHERE subject = $1", subjects.log(2)
        )
        == 2
    )
    assert await fetchval(settings, "SELECT status FROM jobs WHERE build_id = 2") == "IN-PROGRESS"
    assert await fetchval(settings, "SELECT count(*) FROM job_events") == 1


async def test_values_postgres_cannot_hold_are_rejected_alone(settings: Settings) -> None:
    """The schema checks a time's shape, not its calendar, and no integer bounds: such an
    event is valid JSON-Schema-wise but not storable. It is rejected (recorded, counted)
    without holding back the events around it, in the same batch or after."""
    subject = settings.subjects.event("acme", "stg", 5)
    unstorable = [
        job_event(5, 2, "WORKING", updated_at="2026-13-45T07:00:00.123Z"),
        job_event(5, 3, "WORKING", exit_code=2**63),
        job_event(5, 4, "WORKING", requested_by="nul \x00 inside"),
    ]
    async with publisher(settings) as pub:
        # All published before the gateway starts: one batch holds good and bad together.
        await pub.event(job_event(5, 1))
        for event in unstorable:
            await pub.js.publish(subject, codec.dumps(event))
        await pub.event(job_event(5, 5, "SUCCESS"))
        last = await pub.last_seq()
        async with serve_gateway(settings):

            async def stored() -> bool:
                mark = await fetchval(
                    settings, "SELECT max(watermark) FROM ingest_progress WHERE kind = 'events'"
                )
                return bool(mark == last)

            await eventually(stored, timeout=15)
    assert await fetchval(settings, "SELECT count(*) FROM rejected_messages") == 3
    errors = await fetchval(
        settings, "SELECT string_agg(error, ' | ' ORDER BY stream_seq) FROM rejected_messages"
    )
    assert errors.count("not storable") == 3
    assert await fetchval(settings, "SELECT count(*) FROM job_events") == 2
    assert await fetchval(settings, "SELECT seq FROM jobs WHERE build_id = 5") == 5


async def test_variables_come_from_the_first_event_whenever_it_arrives(settings: Settings) -> None:
    variables = {"REGION": "eu", "TOKEN": "***"}
    async with publisher(settings) as pub, serve_gateway(settings) as gw:
        await pub.event(job_event(6, 2, "WORKING"))
        await pub.event(job_event(7, 1, variables=variables))
        await pub.event(job_event(7, 2, "WORKING"))
        last = await pub.last_seq()

        async def stored(last: int) -> bool:
            mark = await fetchval(
                settings, "SELECT max(watermark) FROM ingest_progress WHERE kind = 'events'"
            )
            return bool(mark == last)

        await eventually(lambda: stored(last), timeout=15)
        # Job 6's first event comes late, after its second is stored.
        await pub.event(job_event(6, 1, variables=variables))
        await eventually(lambda: stored(last + 1), timeout=15)
        async with httpx.AsyncClient(base_url=gw.url, headers=auth_headers(settings)) as client:
            six = (await client.get("/api/jobs/6")).json()
            seven = (await client.get("/api/jobs/7")).json()
    assert six["seq"] == 2 and six["status"] == "WORKING" and six["variables"] == variables
    assert seven["seq"] == 2 and seven["variables"] == variables


async def test_a_batch_that_fails_is_stored_before_later_ones_are_acked(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One ack covers everything up to a batch's highest sequence, so a batch that fails
    (here: a bug, once) must be tried again, not skipped for the next one: the next one's
    ack would cover it and it would never come back."""
    original = Ingestor._store
    failed = asyncio.Event()

    async def fails_once(self: Ingestor, batch: list[Decoded]) -> None:
        if self.kind == "events" and not failed.is_set():
            failed.set()
            raise RuntimeError("a bug, once")
        await original(self, batch)

    monkeypatch.setattr(Ingestor, "_store", fails_once)
    async with publisher(settings) as pub:
        for build_id in range(1, 4):
            await pub.event(job_event(build_id, 1))
        async with serve_gateway(settings):
            await asyncio.wait_for(failed.wait(), 15)
            for build_id in range(4, 7):
                await pub.event(job_event(build_id, 1))
            last = await pub.last_seq()

            async def stored() -> bool:
                mark = await fetchval(
                    settings, "SELECT max(watermark) FROM ingest_progress WHERE kind = 'events'"
                )
                return bool(mark == last)

            await eventually(stored, timeout=20)
    assert await fetchval(settings, "SELECT count(*) FROM job_events") == 6


def decoded(stream_seq: int, build_id: int) -> Decoded:
    body = job_event(build_id, 1)
    return Decoded(stream_seq, "xoogify.events.acme.stg.x", body, None, codec.dumps(body))


async def test_watermark_counts_only_a_contiguous_prefix(settings: Settings) -> None:
    async with publisher(settings) as pub, serve_gateway(settings) as gw:
        # The stream holds 1..4, so none of them can be skipped as expired.
        for build_id in range(1, 5):
            await pub.event(job_event(100 + build_id, 1))
        ctx: GatewayContext = dataclasses.replace(gw.app.state.ctx, gateway_id="probe")
        ingestor = Ingestor(ctx, "events")

        async def mark() -> int:
            return int(
                await fetchval(
                    settings,
                    "SELECT watermark FROM ingest_progress WHERE consumer = $1",
                    ingestor.consumer,
                )
            )

        try:
            await ingestor._store([decoded(1, 11), decoded(3, 13)])
            assert await mark() == 1
            await ingestor._store([decoded(4, 14)])
            assert await mark() == 1  # 2 is still missing
            await ingestor._store([decoded(2, 12)])
            assert await mark() == 4
        finally:
            # It keeps a pooled connection between batches; run() would give it back.
            await ingestor._drop_connections()


async def test_ingestion_carries_on_after_a_nats_restart(
    settings: Settings, nats_server: EmbeddedNats | None
) -> None:
    assert nats_server is not None, "needs its own nats-server to restart"
    async with publisher(settings) as pub, serve_gateway(settings):

        async def stored_up_to(last: int) -> bool:
            mark = await fetchval(
                settings, "SELECT max(watermark) FROM ingest_progress WHERE kind = 'events'"
            )
            return bool(mark is not None and mark >= last)

        before = await pub.life(1)
        await eventually(lambda: stored_up_to(before[-1]), timeout=15)
        nats_server.stop()
        nats_server.start()

        async def republished() -> list[int] | None:
            try:
                return await pub.life(2)
            except Exception:
                return None  # still reconnecting

        after = await eventually(republished, timeout=30)
        await eventually(lambda: stored_up_to(after[-1]), timeout=45)
    assert await fetchval(settings, "SELECT count(*) FROM job_events") == 6
    assert await fetchval(settings, "SELECT status FROM jobs WHERE build_id = 2") == "SUCCESS"


async def test_a_batch_that_commits_first_is_acked_after_the_one_read_before_it(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two event batches are stored at once, and the later may commit first. Its ack
    covers every message before it and the watermark says everything up to it is stored,
    so neither may pass the earlier batch until that one has committed too; then the
    watermark catches up with both, though each batch's own mark could not count the
    other."""
    original_reply = Ingestor._reply
    acked: list[int] = []

    async def recorded(self: Ingestor, msg: Any, payload: bytes) -> None:
        if self.kind == "events" and payload == ACK:
            acked.append(reply_stream_seq(msg.reply))
        await original_reply(self, msg, payload)

    monkeypatch.setattr(Ingestor, "_reply", recorded)
    # Batches of any size go beside another (by default only those of a backlog).
    monkeypatch.setattr(ingest, "BESIDE_FROM", 1)
    mark = "SELECT coalesce(max(watermark), 0) FROM ingest_progress WHERE kind = 'events'"
    blocker = await asyncpg.connect(settings.database_url)
    async with publisher(settings) as pub, serve_gateway(settings) as gw:
        # The first event's row, inserted and not committed: the batch that stores the
        # event waits for this transaction, in Postgres, after taking its watermark.
        hold = blocker.transaction()
        await hold.start()
        await blocker.execute(
            "INSERT INTO job_events (event_id, build_id, seq, status, at, stream_seq, payload)"
            " VALUES ('1-1', 1, 1, 'IN-PROGRESS', now(), 1, '{}')"
        )
        first = await pub.event(job_event(1, 1))

        async def first_waits() -> bool:
            waiting = await fetchval(
                settings,
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                " AND query LIKE '%xoogify_ingest_events%'",
            )
            return bool(waiting)

        await eventually(first_waits, timeout=15)
        later = [await pub.event(job_event(build_id, 1)) for build_id in (2, 3, 4)]

        async def later_stored() -> bool:
            count = await fetchval(
                settings, "SELECT count(*) FROM job_events WHERE build_id IN (2, 3, 4)"
            )
            return bool(count == 3)

        await eventually(later_stored, timeout=15)
        # Nothing is acked, and the watermark has not moved past the hole.
        assert acked == []
        assert await fetchval(settings, mark) < first
        await hold.rollback()

        async def caught_up() -> bool:
            return bool(await fetchval(settings, mark) == later[-1])

        await eventually(caught_up, timeout=15)
        consumer = f"ingest-events-{gw.app.state.ctx.gateway_id}"

        async def acked_up_to_the_last() -> bool:
            info = await pub.js.consumer_info(settings.subjects.events_stream, consumer)
            return bool(info.ack_floor.stream_seq == later[-1])

        await eventually(acked_up_to_the_last, timeout=15)
    await blocker.close()
    assert acked == sorted(acked) and acked[-1] == later[-1]
    assert await fetchval(settings, "SELECT count(*) FROM job_events") == 4


async def test_what_arrives_within_the_linger_is_stored_in_one_transaction(
    settings: Settings,
) -> None:
    """At a low rate, messages arriving within the linger after a batch that is not full
    are stored with it: one transaction (one commit), not one per event."""
    lingering = dataclasses.replace(settings, ingest_linger_s=2.0)
    async with publisher(lingering) as pub, serve_gateway(lingering) as gw:
        first = await pub.event(job_event(1, 1))
        consumer = f"ingest-events-{gw.app.state.ctx.gateway_id}"

        async def first_delivered() -> bool:
            info = await pub.js.consumer_info(lingering.subjects.events_stream, consumer)
            return bool(info.delivered.stream_seq >= first)

        # The next event comes only once ingestion holds the first (without the linger,
        # it would store it alone now).
        await eventually(first_delivered, timeout=15)
        await pub.event(job_event(1, 2, "WORKING"))
        await wait_events(settings, 2)
    transactions = "SELECT count(DISTINCT xmin::text) FROM job_events"
    assert await fetchval(settings, transactions) == 1
    assert await fetchval(settings, "SELECT status FROM jobs WHERE build_id = 1") == "WORKING"

"""Two webhook workers (as two gateways would run them) on one real Postgres: the outbox is
filled once per (webhook, event) however many fillers run, only up to the ingestion
watermark, and every delivery reaches the receiver exactly once (SKIP LOCKED claims). A
secret stored in clear (before encryption at rest) is sealed when a worker starts."""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator

import asyncpg
import pytest

from services.common.crypto import StateCipher, generate_state_key
from services.common.timefmt import parse_time
from services.gateway import db, migrate
from services.gateway.webhook_delivery import WebhookConfig, WebhookWorker, fill_outbox
from tests.integration.test_webhooks import receiver, verify
from tests.integration.ws_support import job_event
from tests.support import eventually

FAST = WebhookConfig(backoff_s=0.05, poll_s=0.02, claim_batch=4, workers=3)
CIPHER = StateCipher(generate_state_key())
LEGACY_SECRET = "secret-secret"


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    await migrate.migrate(database_url)
    pool = await db.create_pool(database_url, min_size=2, max_size=20)
    try:
        yield pool
    finally:
        await pool.close()


async def store_events(pool: asyncpg.Pool, count: int, first_stream_seq: int = 1) -> None:
    """Rows as ingestion stores them (job_events only; the watermark is set separately)."""
    rows = []
    for n in range(count):
        build_id = 999 + first_stream_seq + n  # 1000, 1001, … from the first stream_seq
        event = job_event(build_id, 1, "IN-PROGRESS", org="acme" if n % 2 == 0 else "globex")
        rows.append(
            (
                event["event_id"],
                event["build_id"],
                1,
                event["status"],
                parse_time(event["updated_at"]),
                first_stream_seq + n,
                event,
            )
        )
    await pool.executemany(
        "INSERT INTO job_events (event_id, build_id, seq, status, at, stream_seq, payload)"
        " VALUES ($1, $2, $3, $4, $5, $6, $7)",
        rows,
    )


async def set_watermark(pool: asyncpg.Pool, mark: int) -> None:
    await pool.execute(
        "INSERT INTO ingest_progress (consumer, kind, watermark) VALUES ('t', 'events', $1)"
        " ON CONFLICT (consumer) DO UPDATE SET watermark = EXCLUDED.watermark",
        mark,
    )


async def add_webhook(pool: asyncpg.Pool, url: str, org: str = "acme") -> int:
    webhook_id: int = await pool.fetchval(
        "INSERT INTO webhooks (organization, url, statuses, secret)"
        " VALUES ($1, $2, $3, $4) RETURNING id",
        org,
        url,
        ["IN-PROGRESS"],
        LEGACY_SECRET,  # in clear, as before encryption at rest
    )
    return webhook_id


async def test_the_filler_stops_at_the_watermark_and_is_idempotent(pool: asyncpg.Pool) -> None:
    hook = await add_webhook(pool, "http://127.0.0.1:9/h")
    await store_events(pool, 10)
    await set_watermark(pool, 6)  # events 7..10 are stored but not yet contiguous
    assert await fill_outbox(pool, batch=4) == 4
    assert await fill_outbox(pool, batch=4) == 2
    assert await fill_outbox(pool, batch=4) == 0
    count = "SELECT count(*) FROM webhook_deliveries WHERE webhook_id = $1"
    assert await pool.fetchval(count, hook) == 3  # acme's among stream_seq 1..6
    await set_watermark(pool, 10)
    assert await fill_outbox(pool, batch=100) == 4
    # A filler that re-scans (cursor moved back, as after a lost commit) adds nothing.
    await pool.execute("UPDATE webhook_outbox_cursor SET stream_seq = 0")
    await fill_outbox(pool, batch=100)
    assert await pool.fetchval(count, hook) == 5


async def test_with_no_webhook_the_filler_passes_over_what_is_stored_in_one_step(
    pool: asyncpg.Pool,
) -> None:
    """Nobody to deliver to: the cursor goes to the watermark at once, nothing is scanned
    batch after batch; a webhook made afterwards gets what is stored after it."""
    await store_events(pool, 10)
    await set_watermark(pool, 10)
    assert await fill_outbox(pool, batch=4) == 0  # not 4: no batch was scanned
    cursor = "SELECT stream_seq FROM webhook_outbox_cursor WHERE name = 'job_events'"
    assert await pool.fetchval(cursor) == 10
    hook = await add_webhook(pool, "http://127.0.0.1:9/h")
    await store_events(pool, 2, first_stream_seq=11)
    await set_watermark(pool, 12)
    assert await fill_outbox(pool, batch=4) == 2
    rows = await pool.fetch("SELECT event_id FROM webhook_deliveries WHERE webhook_id = $1", hook)
    assert len(rows) == 1  # acme's event at stream_seq 11 (12 is globex's)


async def test_two_workers_deliver_each_event_exactly_once(pool: asyncpg.Pool) -> None:
    async with receiver(fail_first=3) as recv:
        hook = await add_webhook(pool, recv.url("/h"))
        await store_events(pool, 60)
        await set_watermark(pool, 60)
        workers = [WebhookWorker(pool, FAST, CIPHER), WebhookWorker(pool, FAST, CIPHER)]
        for worker in workers:
            worker.start()
        try:
            await eventually(lambda: recv.has_delivered(30), timeout=20)
        finally:
            for worker in workers:
                await worker.stop()
        counts = Counter(r.headers["x-xoogify-event-id"] for r in recv.delivered())
        assert len(counts) == 30 and set(counts.values()) == {1}
        assert len(recv.requests) == 33  # 3 failures, each retried once more
        states = await pool.fetch(
            "SELECT status, count(*) AS n FROM webhook_deliveries WHERE webhook_id = $1"
            " GROUP BY status",
            hook,
        )
        assert {r["status"]: r["n"] for r in states} == {"delivered": 30}
        assert all(verify(LEGACY_SECRET, r) for r in recv.delivered())
        # Sealed at the workers' start (by one of them: the other found it done).
        row = await pool.fetchrow("SELECT * FROM webhooks WHERE id = $1", hook)
        assert row["secret"] is None and row["secret_key_id"] == CIPHER.current
        assert LEGACY_SECRET.encode() not in bytes(row["secret_sealed"])

"""Webhook delivery: a Postgres outbox filled from `job_events` and a worker that POSTs it.

The filler scans `job_events` past its own cursor (kept in Postgres, never beyond the
ingestion watermark, so no stored event is skipped) and inserts one delivery per matching
webhook, idempotently. Delivery loops claim due rows with `FOR UPDATE SKIP LOCKED` and hold
the row lock while POSTing, so several gateways never send the same attempt at once and a
killed gateway's claim is released with its connection. Failures back off exponentially
(base `XOOGIFY_WEBHOOK_BACKOFF_S`, capped at an hour) for `XOOGIFY_WEBHOOK_RETRY_FOR_S`
(24 h), then the delivery is `failed`. Delivery is at least once: receivers dedupe by
`X-Xoogify-Event-Id` and keep the copy with the highest `seq`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
from asyncpg.pool import PoolConnectionProxy
from prometheus_client import Counter

from services.common import codec
from services.common.crypto import SecretsError, StateCipher
from services.gateway import webhook_secrets

log = logging.getLogger(__name__)

MAX_BACKOFF_S = 3600.0
DELIVERIES = Counter(
    "xoogify_webhook_deliveries_total", "Webhook delivery attempts by outcome", ["outcome"]
)


@dataclass(frozen=True)
class WebhookConfig:
    backoff_s: float = 1.0
    retry_for_s: float = 24 * 3600
    timeout_s: float = 10.0
    poll_s: float = 0.5
    fill_batch: int = 500
    claim_batch: int = 8
    workers: int = 4

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> WebhookConfig:
        env = os.environ if env is None else env

        def number(name: str, default: float) -> float:
            value = env.get(name)
            return float(value) if value not in (None, "") else default

        return cls(
            backoff_s=number("XOOGIFY_WEBHOOK_BACKOFF_S", 1.0),
            retry_for_s=number("XOOGIFY_WEBHOOK_RETRY_FOR_S", 24 * 3600),
            timeout_s=number("XOOGIFY_WEBHOOK_TIMEOUT_S", 10.0),
            poll_s=number("XOOGIFY_WEBHOOK_POLL_S", 0.5),
        )


# --- pure parts ------------------------------------------------------------------------
def signature(secret: str, timestamp: int, body: bytes) -> str:
    """`sha256=<hex HMAC-SHA256(secret, "<timestamp>." + body)>`."""
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return "sha256=" + digest.hexdigest()


def delivery_headers(secret: str, event_id: str, body: bytes, timestamp: int) -> dict[str, str]:
    return {
        "Content-Type": "application/json",
        "X-Xoogify-Timestamp": str(timestamp),
        "X-Xoogify-Signature": signature(secret, timestamp, body),
        "X-Xoogify-Event-Id": event_id,
    }


def backoff_s(attempts: int, base: float, cap: float = MAX_BACKOFF_S) -> float:
    """Wait after the `attempts`-th failed attempt: base, 2·base, 4·base … capped."""
    return float(min(base * 2 ** max(attempts - 1, 0), cap))


@dataclass(frozen=True)
class Outcome:
    status: str  # pending, delivered or failed
    attempts: int
    last_status_code: int | None
    last_error: str | None
    next_attempt_at: datetime | None
    delivered_at: datetime | None


def outcome(
    attempts_before: int,
    created_at: datetime,
    now: datetime,
    status_code: int | None,
    error: str | None,
    config: WebhookConfig,
) -> Outcome:
    """What one attempt leaves behind: delivered on 2xx; else retry later, or give up once
    the delivery has been retried for `retry_for_s`."""
    attempts = attempts_before + 1
    if status_code is not None and 200 <= status_code < 300:
        return Outcome("delivered", attempts, status_code, None, None, now)
    if error is None:
        error = f"HTTP {status_code}"
    if (now - created_at).total_seconds() >= config.retry_for_s:
        return Outcome("failed", attempts, status_code, error, None, None)
    wait = timedelta(seconds=backoff_s(attempts, config.backoff_s))
    return Outcome("pending", attempts, status_code, error, now + wait, None)


# --- SQL -------------------------------------------------------------------------------
_LOCK_CURSOR = "SELECT stream_seq FROM webhook_outbox_cursor WHERE name = 'job_events' FOR UPDATE"
_INIT_CURSOR = """
INSERT INTO webhook_outbox_cursor (name, stream_seq) VALUES ('job_events', 0)
ON CONFLICT (name) DO NOTHING
"""
_WATERMARK = "SELECT coalesce(max(watermark), 0) FROM ingest_progress WHERE kind = 'events'"
_SCAN_END = """
SELECT count(*) AS n, max(stream_seq) AS hi FROM (
    SELECT stream_seq FROM job_events WHERE stream_seq > $1 AND stream_seq <= $2
    ORDER BY stream_seq LIMIT $3) s
"""
# The deliveries of stored events `e`: one per webhook of the event's organization that
# asks for its status.
_DELIVERIES_OF = """
INSERT INTO webhook_deliveries (webhook_id, event_id, build_id, seq)
SELECT w.id, e.event_id, e.build_id, e.seq
  FROM job_events e
  JOIN webhooks w ON w.organization = e.payload->>'organization' AND e.status = ANY (w.statuses)
"""
_FILL = f"""{_DELIVERIES_OF}
 WHERE e.stream_seq > $1 AND e.stream_seq <= $2
 ORDER BY e.stream_seq, w.id
ON CONFLICT (webhook_id, event_id) DO NOTHING
"""
_FILL_EVENTS = f"""{_DELIVERIES_OF}
 WHERE e.event_id = ANY ($1::text[])
ON CONFLICT (webhook_id, event_id) DO NOTHING
"""
_MOVE_CURSOR = "UPDATE webhook_outbox_cursor SET stream_seq = $1 WHERE name = 'job_events'"
_ANY_WEBHOOK = "SELECT EXISTS (SELECT 1 FROM webhooks)"
_CLAIM = """
SELECT d.id, d.event_id, d.attempts, d.created_at, w.organization, w.url, w.secret,
       w.secret_key_id, w.secret_sealed, e.payload
  FROM webhook_deliveries d
  JOIN webhooks w ON w.id = d.webhook_id
  JOIN job_events e ON e.event_id = d.event_id
 WHERE d.status = 'pending' AND d.next_attempt_at <= now()
 ORDER BY d.next_attempt_at
 LIMIT $1
 FOR UPDATE OF d SKIP LOCKED
"""
_RECORD = """
UPDATE webhook_deliveries SET status = $2, attempts = $3, last_status_code = $4,
       last_error = $5, next_attempt_at = $6, delivered_at = $7
 WHERE id = $1
"""


async def fill_outbox(pool: asyncpg.Pool, batch: int = 500) -> int:
    """One step of the filler: turn the next stored events into deliveries; return how
    many events were scanned (0 when caught up). Safe to run on several gateways."""
    async with pool.acquire() as conn, conn.transaction():
        cursor = await conn.fetchval(_LOCK_CURSOR)
        if cursor is None:
            await conn.execute(_INIT_CURSOR)
            cursor = await conn.fetchval(_LOCK_CURSOR)
        mark = int(await conn.fetchval(_WATERMARK))
        if mark <= cursor:
            return 0
        if not await conn.fetchval(_ANY_WEBHOOK):
            # Nobody to deliver to: pass over what is stored in one step, rather than scan
            # it batch after batch (during a burst that was a tenth of the gateway's CPU).
            # A webhook made later gets what is stored after it, as it would have from a
            # filler that had scanned these already.
            await conn.execute(_MOVE_CURSOR, mark)
            return 0
        row = await conn.fetchrow(_SCAN_END, cursor, mark, batch)
        assert row is not None  # an aggregate always answers one row
        # A full batch ends at its last row; a short one covers everything up to the mark.
        upper = int(row["hi"]) if row["n"] >= batch else mark
        await conn.execute(_FILL, cursor, upper)
        await conn.execute(_MOVE_CURSOR, upper)
        return int(row["n"])


async def fill_events(
    conn: asyncpg.Connection | PoolConnectionProxy[Any], event_ids: list[str]
) -> None:
    """The deliveries of these stored events, made outside the filler's scan by stream
    sequence (events stored by gateway/store_reset.py have none of their own)."""
    await conn.execute(_FILL_EVENTS, event_ids)


class WebhookWorker:
    """The filler and the delivery loops of one gateway."""

    def __init__(self, pool: asyncpg.Pool, config: WebhookConfig, cipher: StateCipher) -> None:
        self.pool = pool
        self.config = config
        self.cipher = cipher
        self._stopping = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._fill_loop(), name="webhook-fill"),
            asyncio.create_task(self._reseal(), name="webhook-secrets"),
        ]
        self._tasks += [
            asyncio.create_task(self._deliver_loop(), name=f"webhook-deliver-{n}")
            for n in range(self.config.workers)
        ]

    async def stop(self, timeout: float = 5.0) -> None:
        self._stopping.set()
        if not self._tasks:
            return
        _, pending = await asyncio.wait(self._tasks, timeout=timeout)
        for task in pending:
            task.cancel()
        for task in pending:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

    async def _reseal(self) -> None:
        """Secrets stored in clear (before encryption) or under a retired key, sealed under
        the current one; a failure is logged, never fatal (the rows still open)."""
        try:
            changed = await webhook_secrets.reseal(self.pool, self.cipher)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            log.warning("webhook secrets not re-sealed", extra={"error": repr(exc)})
            return
        if changed:
            log.info("webhook secrets re-sealed", extra={"rows": changed})

    async def _fill_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                scanned = await fill_outbox(self.pool, self.config.fill_batch)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Postgres away: try again shortly
                log.warning("webhook outbox fill failed", extra={"error": repr(exc)})
                scanned = 0
            if scanned < self.config.fill_batch:
                await self._pause(self.config.poll_s)

    async def _deliver_loop(self) -> None:
        async with httpx.AsyncClient(timeout=self.config.timeout_s) as http:
            while not self._stopping.is_set():
                try:
                    claimed = await self._deliver_batch(http)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    log.warning("webhook delivery failed", extra={"error": repr(exc)})
                    claimed = 0
                if claimed < self.config.claim_batch:
                    await self._pause(self.config.poll_s)

    async def _deliver_batch(self, http: httpx.AsyncClient) -> int:
        # The row locks are held while POSTing: another gateway skips these rows, and if
        # this one dies the locks go with its connection and the rows are due again.
        async with self.pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(_CLAIM, self.config.claim_batch)
            if not rows:
                return 0
            # return_exceptions: when this loop is cancelled at stop, an attempt that fails
            # as it is torn down must not leave an exception nobody retrieves.
            gathered = await asyncio.gather(
                *(self._attempt(http, row) for row in rows), return_exceptions=True
            )
            results: list[Outcome] = []
            for item in gathered:
                if isinstance(item, BaseException):
                    raise item  # rolled back: the rows are due again
                results.append(item)
            await conn.executemany(
                _RECORD,
                [
                    (
                        row["id"],
                        r.status,
                        r.attempts,
                        r.last_status_code,
                        r.last_error,
                        r.next_attempt_at,
                        r.delivered_at,
                    )
                    for row, r in zip(rows, results, strict=True)
                ],
            )
        return len(rows)

    async def _attempt(self, http: httpx.AsyncClient, row: asyncpg.Record) -> Outcome:
        payload = row["payload"]
        body = payload if isinstance(payload, bytes) else codec.dumps(payload)
        status_code: int | None = None
        error: str | None = None
        try:
            secret = webhook_secrets.open_secret(self.cipher, row)
        except SecretsError as exc:
            # Its key is no longer configured: retried (and then failed) like a dead URL.
            secret, error = None, f"secret does not open: {exc}"[:500]
        if secret is not None:
            headers = delivery_headers(secret, row["event_id"], body, int(time.time()))
            try:
                response = await http.post(row["url"], content=body, headers=headers)
                status_code = response.status_code
            except httpx.HTTPError as exc:
                error = f"{type(exc).__name__}: {exc}"[:500]
        result = outcome(
            row["attempts"], row["created_at"], datetime.now(UTC), status_code, error, self.config
        )
        DELIVERIES.labels(result.status).inc()
        return result

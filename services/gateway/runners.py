"""The runners as `GET /api/runners` and the runners page show them: the live registry in
KV `xoogify-runners`, plus the `runners` table so that one whose key expired stays listed
as `lost` for an hour. One that stopped cleanly is dropped from the list (`forget_stopped`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from nats.js.errors import NotFoundError

from services.common import codec, kvread, schemas
from services.common.timefmt import format_time, parse_time
from services.gateway import db
from services.gateway.context import GatewayContext

log = logging.getLogger(__name__)

KEEP_LOST = timedelta(hours=1)
RETRY_S = 1.0


async def _live(ctx: GatewayContext) -> dict[str, dict[str, Any]]:
    bucket = ctx.settings.subjects.runners_bucket
    try:
        kv = await ctx.js.key_value(bucket)
        # Not `kv.keys()`: nats-py's watcher can stop early while runners heartbeat, and
        # leave a live runner out of the list (services/common/kvread.py).
        entries = await kvread.latest(ctx.js, kv, bucket)
    except NotFoundError:
        return {}
    live: dict[str, dict[str, Any]] = {}
    for entry in entries:
        try:
            value = schemas.decode("runner_registration", entry.value)
        except schemas.SchemaError as exc:
            log.warning(
                "bad runner registration skipped", extra={"key": entry.key, "error": str(exc)}
            )
            continue
        live[value["runner_id"]] = value
    return live


async def list_runners(
    ctx: GatewayContext, scope: Sequence[str] | None = None
) -> list[dict[str, Any]]:
    """Every runner; `current_build_id` only when the job's organization is in `scope`
    (None: every one), so a runner's work does not reveal another organization's job."""
    live = await _live(ctx)
    if live:
        await ctx.pool.executemany(
            "INSERT INTO runners (runner_id, registration, last_seen) VALUES ($1, $2, $3)"
            " ON CONFLICT (runner_id) DO UPDATE SET registration = EXCLUDED.registration,"
            " last_seen = EXCLUDED.last_seen",
            [(rid, reg, parse_time(reg["last_seen"])) for rid, reg in live.items()],
        )
    since = datetime.now(UTC) - KEEP_LOST
    rows = await ctx.pool.fetch(
        "SELECT runner_id, registration, last_seen FROM runners WHERE last_seen > $1"
        " ORDER BY runner_id",
        since,
    )
    items = []
    for row in rows:
        reg = row["registration"]
        if isinstance(reg, str | bytes):
            reg = codec.loads(reg)
        alive = row["runner_id"] in live
        items.append(
            {
                "runner_id": row["runner_id"],
                "arch": reg["arch"],
                "kinds": reg["kinds"],
                "labels": reg["labels"],
                "version": reg["version"],
                "hostname": reg["hostname"],
                "state": reg["state"] if alive else "lost",
                "current_build_id": reg["current_build_id"] if alive else None,
                "last_seen": format_time(row["last_seen"]),
            }
        )
    if scope is not None:
        current = [i["current_build_id"] for i in items if i["current_build_id"] is not None]
        visible = await db.visible_build_ids(ctx.pool, current, scope)
        for item in items:
            if item["current_build_id"] not in visible:
                item["current_build_id"] = None
    return items


async def forget_stopped(ctx: GatewayContext) -> None:
    """Watch the registry for deleted keys and drop those runners from the table. A runner
    that stops cleanly deletes its key, which leaves a delete marker; one that dies lets
    the key expire, which leaves none. So a stopped runner is not shown as `lost` for an
    hour, and a dead one still is. Runs until cancelled; a NATS outage only pauses it."""
    bucket = ctx.settings.subjects.runners_bucket
    while True:
        watcher = None
        try:
            kv = await ctx.js.key_value(bucket)
            watcher = await kv.watchall()
            async for entry in watcher:
                if entry is not None and entry.operation in ("DEL", "PURGE"):
                    await ctx.pool.execute("DELETE FROM runners WHERE runner_id = $1", entry.key)
                    log.info("runner stopped; unlisted", extra={"runner_id": entry.key})
        except asyncio.CancelledError:
            raise
        except NotFoundError:
            pass  # no runner or scheduler has made the bucket yet
        except Exception as exc:
            log.warning("runner registry watch failed; again shortly", extra={"error": repr(exc)})
        finally:
            if watcher is not None:
                with contextlib.suppress(Exception):
                    await watcher.stop()
        await asyncio.sleep(RETRY_S)

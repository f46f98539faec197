"""The gateway process killed (SIGKILL) while events are being published, then started
again: every event ends up in Postgres exactly once."""

from __future__ import annotations

import asyncio

import asyncpg

from services.common.config import Settings
from tests.integration.ws_support import LIFE, publisher
from tests.stack import Stack
from tests.support import eventually

BUILDS = 150


async def test_sigkill_mid_stream_loses_and_duplicates_nothing(
    settings: Settings, stack: Stack
) -> None:
    await stack.start_gateway()
    conn = await asyncpg.connect(settings.database_url)
    try:

        async def stored() -> int:
            return int(await conn.fetchval("SELECT count(*) FROM job_events"))

        async with publisher(settings) as pub:

            async def publish_all() -> None:
                for build_id in range(1, BUILDS + 1):
                    await pub.life(build_id)

            publishing = asyncio.create_task(publish_all())

            # Kill it once it has stored some but (very likely) not all of them.
            async def some_stored() -> bool:
                return await stored() >= 30

            await eventually(some_stored, timeout=20)
            stack.kill("gateway")
            await publishing
            # And some while it is down.
            for build_id in range(BUILDS + 1, BUILDS + 11):
                await pub.life(build_id)
            total = len(LIFE) * (BUILDS + 10)
            assert await pub.last_seq() == total
            await stack.start_gateway("gateway-again")

            async def all_stored() -> bool:
                return await stored() == total

            await eventually(all_stored, timeout=30)
        rows = await conn.fetch(
            "SELECT count(*) AS events, count(DISTINCT (build_id, seq)) AS distinct_events,"
            " count(DISTINCT stream_seq) AS stream_seqs FROM job_events"
        )
        assert dict(rows[0]) == {"events": total, "distinct_events": total, "stream_seqs": total}
        finals = await conn.fetchval(
            "SELECT count(*) FROM jobs WHERE seq = 3 AND status = 'SUCCESS'"
        )
        assert finals == BUILDS + 10
        mark = await conn.fetchval(
            "SELECT max(watermark) FROM ingest_progress WHERE kind = 'events'"
        )
        assert mark == total
    finally:
        await conn.close()

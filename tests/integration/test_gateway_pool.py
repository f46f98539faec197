"""The gateway's pool releases connections without asyncpg's reset query (one round trip
less per release): what a release must still guarantee, on a real Postgres."""

from __future__ import annotations

from services.gateway import db


async def test_a_released_connection_comes_back_clean(database_url: str) -> None:
    pool = await db.create_pool(database_url, min_size=1, max_size=1)
    try:
        async with pool.acquire() as conn:
            assert conn.get_reset_query() == ""
            await conn.execute("CREATE TABLE pool_probe (n int)")
            # Released in the middle of a transaction nobody manages (a bug elsewhere).
            await conn.execute("BEGIN")
            await conn.execute("INSERT INTO pool_probe VALUES (1)")
        async with pool.acquire() as conn:  # the same connection: max_size=1
            # Rolled back, not left open for the next user.
            assert not conn.is_in_transaction()
            assert await conn.fetchval("SELECT count(*) FROM pool_probe") == 0
            # The pool's own session settings and type codecs are still in place.
            assert await conn.fetchval("SHOW plan_cache_mode") == "force_custom_plan"
            assert await conn.fetchval("SELECT '{\"a\": [1]}'::jsonb") == {"a": [1]}
    finally:
        await pool.close()

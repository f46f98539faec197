"""/ws against a real gateway app (uvicorn in-process), real NATS JetStream and Postgres:
live updates, filters, `since` replay with no gap and no repeat, `gap`, and `resync`."""

from __future__ import annotations

import asyncio
from collections import Counter

from services.common.config import Settings
from services.common.embedded import EmbeddedNats
from tests.integration.ws_support import RawWs, job_event, publisher, serve_gateway
from tests.support import WsRecorder, auth_headers, eventually


def stream_seqs(ws: WsRecorder) -> list[int]:
    return [i["stream_seq"] for i in ws.job_items()]


async def test_client_gets_hello_then_every_transition_in_order(settings: Settings) -> None:
    async with publisher(settings) as pub, serve_gateway(settings) as gw:
        before = await pub.life(1)
        async with WsRecorder(gw.ws_url, headers=auth_headers(settings)) as ws:
            assert ws.messages[0] == {"type": "hello", "watermark": before[-1]}
            first = await pub.life(2)
            second = await pub.life(3, org="other")
            await ws.wait_for_seq(second[-1])
        # Nothing from before hello; every event after it, in stream order, none merged.
        assert stream_seqs(ws) == first + second
        assert [i["seq"] for i in ws.job_items(2)] == [1, 2, 3]
        assert [i["status"] for i in ws.job_items(2)] == ["IN-PROGRESS", "WORKING", "SUCCESS"]
        assert ws.job_items(2)[0]["organization"] == "acme"


async def test_filter_by_organization_excludes_others(settings: Settings) -> None:
    async with publisher(settings) as pub, serve_gateway(settings) as gw:
        async with WsRecorder(gw.ws_url, headers=auth_headers(settings)) as ws:
            await ws.send({"type": "filter", "organization": "acme"})
            # The filter is in force once an error frame for a later bad message comes back.
            await ws.send({"type": "nonsense"})
            await ws.wait_for(lambda m: m.get("type") == "error")
            await pub.life(1, org="other")
            acme = await pub.life(2)
            await pub.life(3, org="other")
            marker = await pub.life(4)
            await ws.wait_for_seq(marker[-1])
        assert {i["organization"] for i in ws.job_items()} == {"acme"}
        assert stream_seqs(ws) == acme + marker


async def test_filter_sends_the_update_that_takes_a_job_out(settings: Settings) -> None:
    async with publisher(settings) as pub, serve_gateway(settings) as gw:
        async with WsRecorder(gw.ws_url, headers=auth_headers(settings)) as ws:
            await ws.send({"type": "filter", "status": "IN-PROGRESS", "since": 0})
            await pub.life(1)
            # Events are dispatched in stream order: once job 2 arrives, job 1's SUCCESS
            # has been dispatched too.
            marker = await pub.event(job_event(2, 1))
            await ws.wait_for_seq(marker)
        items = ws.job_items(1)
        assert [i["status"] for i in items][:2] == ["IN-PROGRESS", "WORKING"]
        # The final SUCCESS neither matches nor follows a tracked job: not sent.
        assert all(i["status"] != "SUCCESS" for i in items)


async def test_since_while_publishing_gets_every_event_once(settings: Settings) -> None:
    async with publisher(settings) as pub, serve_gateway(settings) as gw:
        for build_id in range(1, 11):
            await pub.event(job_event(build_id, 1))
        since = await pub.last_seq()
        for build_id in range(1, 11):
            await pub.event(job_event(build_id, 2, "WORKING"))

        async def publish_more() -> list[int]:
            out = []
            for build_id in range(1, 51):
                out.append(await pub.event(job_event(build_id, 3, "SUCCESS")))
                out.append(await pub.event(job_event(100 + build_id, 1)))
                await asyncio.sleep(0)
            return out

        async with WsRecorder(gw.ws_url, headers=auth_headers(settings)) as ws:
            task = asyncio.create_task(publish_more())
            await ws.send({"type": "filter", "since": since})
            published = await task
            last = published[-1]
            await ws.wait_for_seq(last)
        received = [s for s in stream_seqs(ws) if s > since]
        counts = Counter(received)
        assert [s for s, n in counts.items() if n > 1] == []  # no repeat
        assert sorted(counts) == list(range(since + 1, last + 1))  # no gap


async def test_since_older_than_the_stream_gives_gap_then_replay(settings: Settings) -> None:
    async with publisher(settings) as pub, serve_gateway(settings) as gw:
        for build_id in range(1, 6):
            await pub.event(job_event(build_id, 1))
        await pub.js.purge_stream(settings.subjects.events_stream)
        kept = [await pub.event(job_event(build_id, 1)) for build_id in range(6, 9)]
        async with WsRecorder(gw.ws_url, headers=auth_headers(settings)) as ws:
            await ws.send({"type": "filter", "since": 2})
            gap = await ws.wait_for(lambda m: m.get("type") == "gap")
            await ws.wait_for_seq(kept[-1])
        assert gap == {"type": "gap", "requested": 2, "first_available": kept[0]}
        assert ws.messages.index(gap) < next(
            n for n, m in enumerate(ws.messages) if m.get("type") == "jobs"
        )
        assert stream_seqs(ws) == kept


async def test_malformed_messages_get_error_frames_and_the_socket_lives(
    settings: Settings,
) -> None:
    async with publisher(settings) as pub, serve_gateway(settings) as gw:
        async with WsRecorder(gw.ws_url, headers=auth_headers(settings)) as ws:
            for bad in ("{", '{"type":"filter","organization":"a.>"}', "[1]"):
                assert ws._ws is not None
                await ws._ws.send(bad)
            await ws.wait_for(lambda m: m.get("type") == "error" and "name" in m["message"])
            seqs = await pub.life(1)
            await ws.wait_for_seq(seqs[-1])
        errors = [m for m in ws.messages if m.get("type") == "error"]
        assert len(errors) == 3


async def test_a_slow_client_gets_resync_without_blocking_a_fast_one(settings: Settings) -> None:
    # Big events (variables of ~256 KB) fill the slow socket's buffers quickly.
    padding = {f"v{n}": "x" * 4000 for n in range(64)}
    async with publisher(settings) as pub, serve_gateway(settings) as gw:
        gw.hub.queue_limit = 4
        slow = await RawWs.connect(gw.ws_url, headers=auth_headers(settings))
        try:
            hello = await slow.recv()
            assert hello is not None and hello["type"] == "hello"
            async with WsRecorder(gw.ws_url, headers=auth_headers(settings)) as fast:
                # `slow` is not read from here on; `fast` is.
                seqs = [await pub.event(job_event(n, 1, variables=padding)) for n in range(1, 81)]
                await fast.wait_for_seq(seqs[-1], timeout=20)
                assert stream_seqs(fast) == seqs
                assert not any(m.get("type") == "resync" for m in fast.messages)

            # Now read the slow one: some jobs, then resync; the socket stays open.
            received: list[int] = []
            while (message := await asyncio.wait_for(slow.recv(), 20)) is not None:
                if message["type"] == "resync":
                    break
                received += [i["stream_seq"] for i in message["items"]]
            assert message is not None and "fell behind" in message["reason"]
            assert received == seqs[: len(received)] and len(received) < len(seqs)
        finally:
            slow.close()


async def test_a_client_that_stops_reading_is_closed_with_1013(settings: Settings) -> None:
    padding = {f"v{n}": "x" * 4000 for n in range(64)}
    async with publisher(settings) as pub, serve_gateway(settings) as gw:
        gw.hub.stall_timeout = 0.5
        stuck = await RawWs.connect(gw.ws_url, headers=auth_headers(settings))
        try:
            for n in range(1, 81):
                await pub.event(job_event(n, 1, variables=padding))

            async def server_gave_up() -> bool | None:
                return not gw.hub.clients or None

            await eventually(server_gave_up, timeout=20)
            while await asyncio.wait_for(stuck.recv(), 20) is not None:
                pass
            assert stuck.close_code == 1013
        finally:
            stuck.close()


async def test_hub_carries_on_after_a_nats_restart(
    settings: Settings, nats_server: EmbeddedNats | None
) -> None:
    assert nats_server is not None, "needs its own nats-server to restart"
    async with publisher(settings) as pub, serve_gateway(settings) as gw:
        async with WsRecorder(gw.ws_url, headers=auth_headers(settings)) as ws:
            before = await pub.life(1)
            await ws.wait_for_seq(before[-1])
            nats_server.stop()
            nats_server.start()

            async def republished() -> list[int] | None:
                try:
                    return await pub.life(2)
                except Exception:
                    return None  # still reconnecting

            after = await eventually(republished, timeout=30)
            await ws.wait_for_seq(after[-1], timeout=30)
        assert stream_seqs(ws) == before + after


async def test_watchdog_restarts_a_dead_consumer_from_last_seq(settings: Settings) -> None:
    async with publisher(settings) as pub, serve_gateway(settings) as gw:
        gw.hub.watchdog_interval = 0.2
        async with WsRecorder(gw.ws_url, headers=auth_headers(settings)) as ws:
            before = await pub.life(1)
            await ws.wait_for_seq(before[-1])
            # Kill the hub's consumer behind nats-py's back: only the watchdog brings it back.
            await gw.hub._sub.unsubscribe()
            after = await pub.life(2)
            await ws.wait_for_seq(after[-1], timeout=15)
        assert gw.hub.restarts >= 1
        assert stream_seqs(ws) == before + after


async def test_a_bad_event_is_skipped_and_counted(settings: Settings) -> None:
    async with publisher(settings) as pub, serve_gateway(settings) as gw:
        async with WsRecorder(gw.ws_url, headers=auth_headers(settings)) as ws:
            await pub.js.publish(settings.subjects.event("acme", "stg", 1), b'{"build_id": 1}')
            await pub.js.publish(settings.subjects.event("acme", "stg", 2), b"not json")
            good = await pub.life(3)
            await ws.wait_for_seq(good[-1])
        assert gw.hub.rejected == 2
        assert stream_seqs(ws) == good


async def test_a_filter_in_the_url_applies_before_the_first_push(settings: Settings) -> None:
    """`/ws?organization=…&since=…`: the replay comes first, in order, then live, and no
    update outside the filter is ever pushed (with a `filter` message, updates pushed under
    the default before it arrives could be newer than the replay's)."""
    async with publisher(settings) as pub, serve_gateway(settings) as gw:
        old = await pub.life(1)
        await pub.life(2, org="other")
        url = f"{gw.ws_url}?organization=acme&since=0&unrelated=ignored"
        async with WsRecorder(url, headers=auth_headers(settings)) as ws:
            await pub.life(3, org="other")
            marker = await pub.life(4)
            await ws.wait_for_seq(marker[-1])
        assert ws.messages[0]["type"] == "hello"
        assert {i["organization"] for i in ws.job_items()} == {"acme"}
        assert stream_seqs(ws) == old + marker

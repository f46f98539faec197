"""Websocket limits on a real gateway (issue 6, Access 5): a client message over 64 KiB
closes the socket with 1009, more than 50 messages a second with 1008. (A client that
stops reading gets `resync` and then 1013 without slowing anyone: test_ws_live.py.)"""

from __future__ import annotations

import contextlib

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from services.common import codec
from services.common.config import Settings
from tests.integration.ws_support import serve_gateway
from tests.support import WsRecorder, auth_headers


async def test_a_message_over_64_kib_closes_the_socket_with_1009(settings: Settings) -> None:
    async with serve_gateway(settings) as gw:
        headers = auth_headers(settings)
        async with connect(gw.ws_url, additional_headers=headers) as ws:
            await ws.recv()  # hello
            # Just under the limit is read (and answered: it is not a valid message).
            await ws.send(codec.dumps_str({"type": "filter", "q": "x" * (60 * 1024)}))
            assert "error" in str(await ws.recv())
            await ws.send(codec.dumps_str({"type": "filter", "q": "x" * (65 * 1024)}))
            with contextlib.suppress(ConnectionClosed):
                while True:
                    await ws.recv()
            assert ws.close_code == 1009
        # Others carry on.
        async with WsRecorder(gw.ws_url, headers=headers) as other:
            assert other.hello["type"] == "hello"


async def test_more_than_50_messages_a_second_closes_the_socket_with_1008(
    settings: Settings,
) -> None:
    async with serve_gateway(settings) as gw:
        headers = auth_headers(settings)
        async with connect(gw.ws_url, additional_headers=headers) as ws:
            await ws.recv()  # hello
            message = codec.dumps_str({"type": "unfollow_logs", "build_id": 1})
            with contextlib.suppress(ConnectionClosed):
                for _ in range(200):
                    await ws.send(message)
                while True:
                    await ws.recv()
            assert ws.close_code == 1008
            assert ws.close_reason == "too many messages"
        assert not gw.hub.clients  # off the hub too


async def test_a_burst_within_the_limit_is_served(settings: Settings) -> None:
    async with serve_gateway(settings) as gw:
        async with WsRecorder(gw.ws_url, headers=auth_headers(settings)) as ws:
            for n in range(45):
                await ws.send({"type": "unfollow_logs", "build_id": n + 1})
            # The last of the burst is still read and answered: the socket stays open.
            await ws.send({"type": "bogus"})
            error = await ws.wait_for(lambda m: m.get("type") == "error")
            assert "type must be" in error["message"]
            assert len(gw.hub.clients) == 1


async def test_a_bad_filter_in_the_url_gets_its_reason_and_1008(settings: Settings) -> None:
    async with serve_gateway(settings) as gw:
        url = f"{gw.ws_url}?organization=acme&since=soon"
        async with connect(url, additional_headers=auth_headers(settings)) as ws:
            error = codec.loads(await ws.recv())
            with contextlib.suppress(ConnectionClosed):
                while True:
                    await ws.recv()
        assert error["type"] == "error" and "since" in error["message"]
        assert ws.close_code == 1008

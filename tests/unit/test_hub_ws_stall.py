"""A socket whose client stopped reading: `Connection.watch` notices the send that never
finishes (one check a few times per timeout, no timer per send)."""

from __future__ import annotations

import asyncio
from typing import Any, cast

from starlette.websockets import WebSocket

from services.gateway.ws import Connection, Stalled


class _Socket:
    """A websocket whose sends never complete, like one with full buffers."""

    def __init__(self) -> None:
        self.sent: list[str] = []
        self.block = asyncio.Event()

    async def send_text(self, text: str) -> None:
        self.sent.append(text)
        await self.block.wait()


def connection(socket: Any, timeout: float) -> Connection:
    return Connection(cast(WebSocket, socket), timeout)


async def test_a_send_that_never_finishes_is_noticed() -> None:
    socket = _Socket()
    conn = connection(socket, 0.05)
    send = asyncio.create_task(conn.send("frame"))
    await asyncio.wait_for(conn.watch(), 5)
    assert conn.stalled.is_set() and socket.sent == ["frame"]
    send.cancel()
    try:
        await conn.send("next")
    except Stalled:
        pass
    else:
        raise AssertionError("a stalled connection took another send")


async def test_finished_sends_leave_nothing_to_notice() -> None:
    socket = _Socket()
    socket.block.set()
    conn = connection(socket, 0.05)
    for n in range(3):
        await conn.send(f"frame {n}")
    # `watch` only looks at a send in progress: between sends there is none.
    assert conn.sending_since is None and socket.sent == ["frame 0", "frame 1", "frame 2"]

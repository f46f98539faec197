"""A gateway served in-process (uvicorn on the settings' port) for the /ws tests, and a
publisher of job events and log chunks as the scheduler and runners would publish them."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import socket
import struct
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

import httpx
import uvicorn
from nats.aio.client import Client
from nats.js import JetStreamContext
from starlette.applications import Starlette

from services.common import bus, codec
from services.common.config import Settings
from services.common.subjects import event_msg_id
from services.gateway.app import create_app, server_config
from services.gateway.hub import Hub

AT = "2026-11-24T07:00:00.123Z"


def job_event(
    build_id: int,
    seq: int,
    status: str = "IN-PROGRESS",
    org: str = "acme",
    env: str = "stg",
    **extra: Any,
) -> dict[str, Any]:
    event: dict[str, Any] = {
        "build_id": build_id,
        "organization": org,
        "environment": env,
        "module_type": "amd64/script",
        "module_name": "hello",
        "action": "PLAN",
        "status": status,
        "reason": "exit-code" if status == "FAILURE" else None,
        "exit_code": 3 if status == "FAILURE" else (0 if status == "SUCCESS" else None),
        "runner_id": None if status == "IN-PROGRESS" else "runner-1",
        "queue_position": None,
        "seq": seq,
        "requested_by": "alice",
        "submitted_at": AT,
        "started_at": None if status == "IN-PROGRESS" else AT,
        "finished_at": AT if status in ("SUCCESS", "FAILURE") else None,
        "updated_at": AT,
        "event_id": f"{build_id}-{seq}",
    }
    event.update(extra)
    return event


LIFE = ("IN-PROGRESS", "WORKING", "SUCCESS")


@dataclass
class Publisher:
    settings: Settings
    nc: Client
    js: JetStreamContext

    async def event(self, event: dict[str, Any]) -> int:
        subject = self.settings.subjects.event(
            event["organization"], event["environment"], event["build_id"]
        )
        ack = await self.js.publish(
            subject,
            codec.dumps(event),
            headers={"Nats-Msg-Id": event_msg_id(event["build_id"], event["seq"])},
        )
        return int(ack.seq)

    async def life(self, build_id: int, **kw: Any) -> list[int]:
        """Publish a job's whole life; return the stream sequences."""
        return [
            await self.event(job_event(build_id, seq, status, **kw))
            for seq, status in enumerate(LIFE, start=1)
        ]

    async def chunk(self, build_id: int, offset: int, data: str, eof: bool = False) -> None:
        body = {"build_id": build_id, "offset": offset, "data": data, "eof": eof}
        await self.js.publish(self.settings.subjects.log(build_id), codec.dumps(body))

    async def last_seq(self) -> int:
        info = await self.js.stream_info(self.settings.subjects.events_stream)
        return int(info.state.last_seq)


@contextlib.asynccontextmanager
async def publisher(settings: Settings) -> AsyncIterator[Publisher]:
    nc = await bus.connect(settings, "test-publisher")
    js = nc.jetstream()
    await bus.ensure_streams(js, settings)
    try:
        yield Publisher(settings, nc, js)
    finally:
        await nc.drain()


@dataclass
class Gateway:
    app: Starlette
    url: str

    @property
    def ws_url(self) -> str:
        return self.url.replace("http://", "ws://") + "/ws"

    @property
    def hub(self) -> Hub:
        hub = self.app.state.ctx.hub
        assert hub is not None
        return hub


@contextlib.asynccontextmanager
async def serve_gateway(settings: Settings) -> AsyncIterator[Gateway]:
    """The real app, served by uvicorn in this process on the settings' gateway port."""
    app = create_app(settings)
    port = int(urlparse(settings.gateway_url).port or 80)
    # The production server options (websocket limits included), logging left to pytest.
    server = uvicorn.Server(server_config(app, "127.0.0.1", port, log_level="warning"))
    task = asyncio.create_task(server.serve())
    try:
        async with asyncio.timeout(30), httpx.AsyncClient() as http:
            # Listening first, then ready (NATS, Postgres and the hub up).
            while True:
                if task.done():
                    task.result()
                    raise RuntimeError("gateway stopped before it was ready")
                if server.started:
                    with contextlib.suppress(httpx.HTTPError):
                        ready = await http.get(f"{settings.gateway_url}/readyz", timeout=1)
                        if ready.status_code == 200 and app.state.ctx.hub is not None:
                            break
                await asyncio.sleep(0.02)
        yield Gateway(app, settings.gateway_url)
    finally:
        server.should_exit = True
        try:
            await asyncio.wait_for(task, 30)
        except TimeoutError:
            # What the gateway was still waiting for: CI keeps only the output.
            for other in asyncio.all_tasks():
                other.print_stack(limit=8, file=sys.stderr)
            raise


class RawWs:
    """A websocket client on a raw socket with a tiny receive buffer: it reads only when
    told to, so a test can make it a client that stops reading, for real."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.close_code: int | None = None

    @classmethod
    async def connect(cls, url: str, headers: dict[str, str] | None = None) -> RawWs:
        parsed = urlparse(url)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (parsed.hostname, parsed.port))
        reader, writer = await asyncio.open_connection(sock=sock, limit=4096)
        key = base64.b64encode(os.urandom(16)).decode()
        extra = "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
        writer.write(
            (
                f"GET {parsed.path} HTTP/1.1\r\nHost: {parsed.netloc}\r\n"
                "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
            ).encode()
        )
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101"), head
        return cls(reader, writer)

    async def recv(self) -> dict[str, Any] | None:
        """The next text message, or None once the server closed (see `close_code`)."""
        payload = bytearray()
        while True:
            b0, b1 = await self.reader.readexactly(2)
            length = b1 & 0x7F
            if length == 126:
                length = struct.unpack("!H", await self.reader.readexactly(2))[0]
            elif length == 127:
                length = struct.unpack("!Q", await self.reader.readexactly(8))[0]
            data = await self.reader.readexactly(length)
            opcode = b0 & 0x0F
            if opcode == 0x8:
                self.close_code = struct.unpack("!H", data[:2])[0] if len(data) >= 2 else None
                return None
            if opcode in (0x9, 0xA):
                continue  # ping / pong
            payload += data
            if b0 & 0x80:
                return dict(codec.loads(bytes(payload)))

    def close(self) -> None:
        self.writer.close()

"""Prometheus metrics shared by the services, and a tiny /metrics + /healthz server for the
processes that have no HTTP server of their own (scheduler, runner)."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, Counter, generate_latest

from services.common.pull import stream_seq
from services.common.subjects import Subjects, family

log = logging.getLogger(__name__)

REJECTED = Counter(
    "xoogify_rejected_messages_total",
    "Messages refused at a service boundary (malformed, wrong schema, oversized)",
    ["service", "subject"],
)


def stream_seq_of(msg: Any) -> int | None:
    """The stream sequence of a JetStream message (nats-py's `Msg` or a pull `Delivery`);
    None for a core NATS message."""
    try:
        return stream_seq(msg)
    except Exception:
        return None


def reject(service: str, subjects: Subjects, subject: str, error: object, **where: Any) -> None:
    """Count a message refused at `service`'s boundary (labelled by subject family) and
    record it as one structured log line: subject, where it was (stream_seq, key), why."""
    REJECTED.labels(service=service, subject=family(subjects, subject)).inc()
    log.warning(
        "message rejected",
        extra={"service": service, "subject": subject, "error": str(error)[:2000], **where},
    )


async def serve_metrics(
    port: int,
    healthy: Callable[[], bool] = lambda: True,
    host: str = "127.0.0.1",
    details: Callable[[], dict[str, Any]] | None = None,
) -> asyncio.Server:
    """Answer GET /metrics (Prometheus text) and GET /healthz on `port`; `details` adds
    fields to the /healthz body (the scheduler's leadership)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readline(), 5)
            while (await asyncio.wait_for(reader.readline(), 5)) not in (b"\r\n", b"\n", b""):
                pass
            path = request.split()[1].decode() if len(request.split()) > 1 else "/"
            if path.startswith("/metrics"):
                status, ctype, body = "200 OK", CONTENT_TYPE_LATEST, generate_latest()
            elif path.startswith("/healthz"):
                ok = healthy()
                status = "200 OK" if ok else "503 Service Unavailable"
                # The same shape as the gateway's /healthz.
                ctype = "application/json"
                answer = {"status": "ok" if ok else "unhealthy", **(details() if details else {})}
                body = json.dumps(answer).encode()
            else:
                status, ctype, body = "404 Not Found", "application/json", b'{"error": "not found"}'
            head = f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\n"
            head += f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            writer.write(head.encode() + body)
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(handle, host, port)

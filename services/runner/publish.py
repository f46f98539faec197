"""JetStream publishing that waits out a short outage: the scheduler or NATS may be away for
a moment, and a log chunk or a report must not be lost."""

from __future__ import annotations

import asyncio
import logging

from nats.errors import Error as NatsError

from services.common.jspub import JsPublisher

log = logging.getLogger(__name__)


async def publish_until_acked(
    pub: JsPublisher,
    subject: str,
    payload: bytes,
    headers: dict[str, str] | None = None,
    timeout_s: float = 5.0,
    max_backoff_s: float = 2.0,
) -> None:
    """Publish and retry (with a Nats-Msg-Id in `headers`, retries are deduplicated) until
    JetStream acknowledges."""
    backoff = 0.1
    while True:
        try:
            await pub.publish(subject, payload, timeout=timeout_s, headers=headers)
            return
        except (NatsError, TimeoutError) as exc:
            extra = {"subject": subject, "error": repr(exc)}
            log.warning("publish not acked; retrying", extra=extra)
        await asyncio.sleep(backoff)
        backoff = min(backoff * 2, max_backoff_s)

"""The durable pull consumers a runner takes work from: one per <arch>.<kind>, created by
whoever comes first (runner or scheduler), never one consumer for two filters."""

from __future__ import annotations

import logging

from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig
from nats.js.errors import BadRequestError

from services.common.config import Settings

log = logging.getLogger(__name__)

ACK_WAIT_S = 30.0


def consumer_config(settings: Settings, arch: str, kind: str) -> ConsumerConfig:
    return ConsumerConfig(
        durable_name=settings.subjects.dispatch_consumer(arch, kind),
        filter_subject=settings.subjects.dispatch(arch, kind),
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=ACK_WAIT_S,
        max_deliver=-1,
    )


async def ensure_consumer(js: JetStreamContext, settings: Settings, arch: str, kind: str) -> str:
    """Create the durable consumer of `<arch>.<kind>` if missing; return its name.

    An existing one is used as it is (the scheduler may have made it with other small
    settings), but only if its filter is ours: nats-py would otherwise silently pull from
    another subject."""
    config = consumer_config(settings, arch, kind)
    stream = settings.subjects.dispatch_stream
    name = str(config.durable_name)
    try:
        await js.add_consumer(stream, config)
    except BadRequestError as exc:
        extra = {"consumer": name, "error": str(exc)}
        log.info("dispatch consumer exists with other settings", extra=extra)
    info = await js.consumer_info(stream, name)
    if info.config.filter_subject != config.filter_subject:
        raise RuntimeError(
            f"consumer {name} filters {info.config.filter_subject!r}, not {config.filter_subject!r}"
        )
    return name


async def subscribe(
    js: JetStreamContext, settings: Settings, arch: str, kind: str
) -> JetStreamContext.PullSubscription:
    name = await ensure_consumer(js, settings, arch, kind)
    return await js.pull_subscribe_bind(name, stream=settings.subjects.dispatch_stream)


async def fetch_one(sub: JetStreamContext.PullSubscription, timeout_s: float) -> list[Msg]:
    """At most one message; none when the queue stayed empty for `timeout_s`."""
    try:
        return await sub.fetch(1, timeout=timeout_s)
    except NatsTimeoutError:
        return []

"""NATS connections and the JetStream streams and KV buckets every service relies on.

`ensure_streams` is idempotent and run by each service at start-up, so any of them may
start first. The streams whose sequences Postgres records (submissions: the build IDs;
events and logs: the watermarks) are made by the gateway alone, which checks them
against Postgres as it starts (`gateway/store_reset.py`); the other services wait for
them. Made by a scheduler or runner after NATS lost its store, they would number from 1
again before any gateway could check them: a new job would take an old job's build ID.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, overload

import nats
from nats.aio.client import Client
from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from nats.js.api import (
    DiscardPolicy,
    KeyValueConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
    StreamInfo,
)
from nats.js.errors import BadRequestError, NotFoundError

from services.common import nats_auth
from services.common.config import Settings

log = logging.getLogger(__name__)

DAY = 24 * 3600
# A service's exit code when NATS lost its store under it: EX_TEMPFAIL, start it again
# (`xoogify up` and compose.yaml's restart policy do).
STORE_LOST_EXIT = 75
# How often a running service checks that its streams or buckets still exist.
STORE_CHECK_S = 2.0
T = TypeVar("T")


@overload
async def until_done(what: str, attempt: Callable[[], Awaitable[T]]) -> T: ...


@overload
async def until_done(
    what: str, attempt: Callable[[], Awaitable[T]], stop: asyncio.Event
) -> T | None: ...


async def until_done(
    what: str, attempt: Callable[[], Awaitable[T]], stop: asyncio.Event | None = None
) -> T | None:
    """`attempt` until it succeeds, backing off to 5 s between tries; None as soon as `stop`
    is set (an attempt under way is cancelled: `nats.connect` itself waits for as long as
    no server answers). For start-up: NATS may start after a service, and on a cluster a
    stream or bucket just created (by this service or another starting at the same time)
    answers nothing, or times out, until its replicas elect a leader. A service that gave
    up then would be down for good: nothing restarts it under `xoogify up`."""
    stopped = asyncio.ensure_future(stop.wait()) if stop is not None else None
    delay = 0.2
    try:
        while True:
            tried = asyncio.ensure_future(attempt())
            await asyncio.wait(
                {tried} | ({stopped} if stopped else set()), return_when="FIRST_COMPLETED"
            )
            if not tried.done():
                tried.cancel()
                with contextlib.suppress(asyncio.CancelledError, NatsError, OSError):
                    await tried
                return None
            try:
                return tried.result()
            except (NatsError, OSError) as exc:  # nats-py's TimeoutError is both
                extra = {"what": what, "error": repr(exc), "retry_s": delay}
                log.warning("nats not ready; retrying", extra=extra)
            if stopped is None:
                await asyncio.sleep(delay)
            else:
                await asyncio.wait({stopped}, timeout=delay)
                if stopped.done():
                    return None
            delay = min(delay * 2, 5.0)
    finally:
        if stopped is not None:
            stopped.cancel()


async def connect(settings: Settings, name: str, **options: Any) -> Client:
    """Connect for good: reconnect forever, so a NATS restart is a pause, not an outage."""

    async def on_error(exc: Exception) -> None:
        log.warning("nats error", extra={"service": name, "error": repr(exc)})

    async def on_disconnect() -> None:
        log.warning("nats disconnected", extra={"service": name})

    async def on_reconnect() -> None:
        log.info("nats reconnected", extra={"service": name})

    # With a per-role NATS user (xoogify up, docs/security.md) replies and deliveries come
    # to that user's own inbox prefix, the only one it may subscribe to.
    prefix = nats_auth.inbox_prefix_for_url(settings.nats_url)
    if prefix is not None:
        options.setdefault("inbox_prefix", prefix)
    return await nats.connect(
        settings.nats_servers,
        name=name,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.5,
        error_cb=on_error,
        disconnected_cb=on_disconnect,
        reconnected_cb=on_reconnect,
        **options,
    )


def stream_configs(settings: Settings) -> list[StreamConfig]:
    s = settings.subjects
    configs = [
        # The submission's stream sequence is its build_id; Idempotency-Key → Nats-Msg-Id,
        # so a retried submission within 24 h is the same job.
        StreamConfig(
            name=s.submit_stream,
            subjects=[s.submit],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            max_age=settings.events_max_age_s,
            duplicate_window=DAY,
        ),
        StreamConfig(
            name=s.events_stream,
            subjects=[s.events_filter()],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            max_age=settings.events_max_age_s,
            duplicate_window=600,
        ),
        StreamConfig(
            name=s.logs_stream,
            subjects=[s.logs_all],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            max_age=settings.logs_max_age_s,
            max_msg_size=2 * 1024 * 1024,
            duplicate_window=120,
        ),
        StreamConfig(
            name=s.dispatch_stream,
            subjects=[s.dispatch_all],
            retention=RetentionPolicy.WORK_QUEUE,
            storage=StorageType.FILE,
            duplicate_window=600,
        ),
        StreamConfig(
            name=s.reports_stream,
            subjects=[s.reports_all],
            retention=RetentionPolicy.WORK_QUEUE,
            storage=StorageType.FILE,
            duplicate_window=600,
            discard=DiscardPolicy.OLD,
        ),
    ]
    for config in configs:
        config.num_replicas = settings.stream_replicas
    return configs


class StreamsMissing(NatsError):
    """A stream this service uses but may not make does not exist yet."""


async def ensure_streams(
    js: JetStreamContext, settings: Settings, waits_for: tuple[str, ...] | None = None
) -> None:
    """Make the streams (the gateway, and tests acting as it: every one); with `waits_for`
    (the scheduler and the runners), make only those not numbered by Postgres, and raise
    StreamsMissing while one of `waits_for` does not exist (`until_done` retries)."""
    configs = stream_configs(settings)
    if waits_for is not None:
        gateway_only = settings.subjects.numbered_by_postgres
        configs = [c for c in configs if c.name not in gateway_only]
    for config in configs:
        try:
            await js.add_stream(config)
        except BadRequestError:
            # Exists with other settings (retention changed by the operator): update it.
            with contextlib.suppress(BadRequestError):
                await js.update_stream(config)
    missing = []
    for name in waits_for or ():
        try:
            await js.stream_info(name)
        except NotFoundError:
            missing.append(name)
    if missing:
        raise StreamsMissing(f"waiting for a gateway to make {', '.join(missing)}")
    if settings.stream_replicas > 1:
        for config in configs:
            # Creating an existing stream with the same config answers its info, and every
            # role may do that (not every role may ask for the info of every stream).
            await wait_stream_leader(js, str(config.name), functools.partial(_info, js, config))
        for name in waits_for or ():
            await wait_stream_leader(js, name)


async def until_store_lost(js: JetStreamContext, names: tuple[str, ...]) -> None:
    """Return (having said so) once one of the streams `names` is gone: NATS answered that
    it does not exist, it is not merely away or electing a leader. For a service that
    outlives a NATS that lost its store: it must stop with STORE_LOST_EXIT and start again
    (the gateway then checks the new streams against Postgres) rather than go on with
    streams and buckets that no longer exist, or that a restarted service made anew."""
    while True:
        await asyncio.sleep(STORE_CHECK_S)
        for name in names:
            try:
                await js.stream_info(name)
            except NotFoundError:
                log.critical(
                    "NATS lost its store: stopping, to be started again",
                    extra={"stream": name, "exit_code": STORE_LOST_EXIT},
                )
                return
            except (NatsError, TimeoutError, OSError):
                pass  # away or failing over: not a loss


async def _info(js: JetStreamContext, config: StreamConfig) -> StreamInfo:
    try:
        return await js.add_stream(config)
    except BadRequestError:
        return await js.stream_info(str(config.name))


async def wait_stream_leader(
    js: JetStreamContext,
    stream: str,
    probe: Callable[[], Awaitable[StreamInfo]] | None = None,
    timeout: float = 30.0,
) -> None:
    """On a cluster, a stream just created (or whose leader node died) takes a few seconds
    to elect a leader; until then a publish gets no response. Wait for it at start-up,
    so a service's first write does not fail."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        with contextlib.suppress(Exception):
            info = await (probe() if probe else js.stream_info(stream))
            if info.cluster is None or info.cluster.leader:
                return
        if loop.time() > deadline:
            raise TimeoutError(f"stream {stream} has no leader after {timeout}s")
        await asyncio.sleep(0.2)


async def ensure_kv(
    js: JetStreamContext, bucket: str, ttl: float | None = None, replicas: int = 1
) -> Any:
    """The bucket, created when missing with `replicas` copies (Settings.stream_replicas);
    `ttl` applies to every key of the bucket."""
    try:
        kv = await js.key_value(bucket)
    except (NotFoundError, Exception):
        config = KeyValueConfig(
            bucket=bucket, storage=StorageType.FILE, history=1, replicas=replicas
        )
        if ttl:
            config.ttl = ttl
        try:
            kv = await js.create_key_value(config)
        except BadRequestError:
            kv = await js.key_value(bucket)
    if replicas > 1:
        await wait_stream_leader(js, f"KV_{bucket}")
    return kv

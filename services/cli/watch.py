"""`xoogify watch`: status events straight from the `XOOGIFY_EVENTS` stream, one JSON line
each (the job event plus its `stream_seq`), live until stopped.

It reads NATS directly (an ordered consumer on the narrowest subject filter), so it needs
no gateway and sees events before they are stored. `--since SEQ` resumes just after SEQ;
`--since 10m` starts that long ago. A SEQ the stream no longer holds prints a `gap` line
and exits 3, unless `--allow-gap`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import re
import signal
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TextIO

import nats
from nats.aio.client import Client
from nats.js.api import ConsumerConfig, DeliverPolicy

from services.common import codec, schemas
from services.common.config import Settings
from services.common.status import Status

EXIT_OK, EXIT_USAGE, EXIT_GAP, EXIT_INTERRUPTED = 0, 2, 3, 130

_DURATION = re.compile(r"^(\d+)([smhd])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


@dataclass(frozen=True)
class Since:
    """Where to start: after a stream sequence, from a moment, or (both None) from now."""

    seq: int | None = None
    moment: datetime | None = None


def parse_since(text: str | None, now: datetime | None = None) -> Since:
    """`None` → live only; `"42"` → after stream sequence 42; `"10m"`/`"30s"`/`"2h"`/`"1d"`
    → from that long before `now`. ValueError for anything else."""
    if text is None:
        return Since()
    text = text.strip()
    if text.isascii() and text.isdigit():  # isdigit alone takes "²", which int() refuses
        return Since(seq=int(text))
    match = _DURATION.match(text)
    if not match:
        raise ValueError(f"--since wants a stream sequence or a duration like 10m, got {text!r}")
    seconds = int(match.group(1)) * _UNITS[match.group(2)]
    return Since(moment=(now or datetime.now(UTC)) - timedelta(seconds=seconds))


@dataclass(frozen=True)
class Start:
    """The consumer's start, and the gap line to print first when SEQ is gone."""

    deliver_policy: DeliverPolicy
    opt_start_seq: int | None = None
    opt_start_time: datetime | None = None
    gap: dict[str, Any] | None = None


def plan_start(since: Since, first_seq: int) -> Start:
    """Pure: how to start reading given the stream's first retained sequence."""
    if since.seq is not None:
        wanted = since.seq + 1
        if wanted < first_seq:
            gap = {"type": "gap", "requested": since.seq, "first_available": first_seq}
            return Start(DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=first_seq, gap=gap)
        return Start(DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=wanted)
    if since.moment is not None:
        return Start(DeliverPolicy.BY_START_TIME, opt_start_time=since.moment)
    return Start(DeliverPolicy.NEW)


def event_line(stream_seq: int, data: bytes, status: str | None) -> str | None:
    """The JSON line for one stream message, or None when it is filtered out or malformed."""
    try:
        job = dict(schemas.decode("job_event", data))
    except schemas.SchemaError:
        return None
    if status is not None and job["status"] != status:
        return None
    job["stream_seq"] = stream_seq
    return codec.dumps_str(job)


def _write(out: TextIO, line: str) -> None:
    out.write(line + "\n")
    out.flush()


async def _connect(settings: Settings, on_reconnect: Callable[[], Awaitable[None]]) -> Client:
    """Reconnect forever, quietly: stderr stays clean for scripts, stdout is the data."""

    async def quiet(*_: Any) -> None:
        return None

    return await nats.connect(
        settings.nats_servers,
        name="xoogify-watch",
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.5,
        error_cb=quiet,
        disconnected_cb=quiet,
        reconnected_cb=on_reconnect,
        closed_cb=quiet,
    )


class _Gap(Exception):
    """A resume point the stream no longer holds, without --allow-gap."""


async def _retry(step: Callable[[], Awaitable[None]]) -> None:
    """Until it works: just after a reconnect JetStream may not answer yet."""
    delay = 0.2
    while True:
        try:
            await step()
            return
        except _Gap:
            raise
        except Exception:
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)


async def watch(
    settings: Settings,
    organization: str | None,
    environment: str | None,
    status: str | None,
    since: Since,
    allow_gap: bool,
    out: TextIO,
) -> int:
    subjects = settings.subjects
    # Stream messages, or None after a reconnect: the ordered consumer may have died with
    # the server, so it is made again from the last sequence handled.
    queue: asyncio.Queue[tuple[int, bytes] | None] = asyncio.Queue(maxsize=10_000)

    async def on_reconnect() -> None:
        await queue.put(None)

    async def on_message(msg: Any) -> None:
        # Back-pressure: the ordered consumer's flow control slows the server down.
        await queue.put((msg.metadata.sequence.stream, msg.data))

    nc = await _connect(settings, on_reconnect)
    js = nc.jetstream()
    sub: Any = None

    async def subscribe(resume: Since) -> None:
        nonlocal sub
        if sub is not None:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        info = await js.stream_info(subjects.events_stream)
        # An empty stream reports first_seq = last_seq + 1 (or 0 when never written).
        start = plan_start(resume, max(int(info.state.first_seq), 1))
        if start.gap is not None:
            _write(out, codec.dumps_str(start.gap))
            if not allow_gap:
                raise _Gap()
        sub = await js.subscribe(
            subjects.events_filter(organization, environment),
            stream=subjects.events_stream,
            cb=on_message,
            ordered_consumer=True,
            config=ConsumerConfig(
                deliver_policy=start.deliver_policy,
                opt_start_seq=start.opt_start_seq,
                opt_start_time=start.opt_start_time,
            ),
        )

    try:
        if since.seq is None and since.moment is None:
            # "From now" as a sequence, so that a resubscription has a resume point.
            info = await js.stream_info(subjects.events_stream)
            since = Since(seq=int(info.state.last_seq))
        resume = since
        last = since.seq or 0
        await subscribe(resume)
        while True:
            item = await queue.get()
            if item is None:
                await _retry(functools.partial(subscribe, resume))
                continue
            seq, data = item
            if seq <= last:
                continue  # a remade consumer overlaps what was already handled
            last, resume = seq, Since(seq=seq)
            line = event_line(seq, data, status)
            if line is not None:
                _write(out, line)
    except _Gap:
        return EXIT_GAP
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(nc.close(), 2)


def _valid_status(value: str | None) -> str | None:
    if value is not None and value not in {s.value for s in Status}:
        raise ValueError(f"--status must be one of {[s.value for s in Status]}")
    return value


async def _main(args: argparse.Namespace, settings: Settings) -> int:
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, task.cancel)
    try:
        return await watch(
            settings,
            args.org,
            args.env,
            _valid_status(args.status),
            parse_since(args.since),
            args.allow_gap,
            sys.stdout,
        )
    except asyncio.CancelledError:
        return EXIT_INTERRUPTED


def run(args: argparse.Namespace, settings: Settings) -> int:
    try:
        return asyncio.run(_main(args, settings))
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except ValueError as exc:
        print(f"xoogify: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:
        # `xoogify watch | head` closed our stdout: stop quietly.
        return EXIT_OK
    except (OSError, Exception) as exc:  # NATS unreachable, stream missing
        print(f"xoogify: watch failed: {exc!r}", file=sys.stderr)
        return EXIT_USAGE

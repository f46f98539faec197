"""JetStream publishing for many small messages, cheaply.

nats-py's `js.publish` is a core request: a reply inbox entry, a future and an
`asyncio.wait_for` per call, then its `Msg` for the ack and a `PubAck` dataclass from
`json.loads`: 32 to 56 µs of CPU per publish, and a job makes about fifteen. Here one
wildcard inbox subscription per connection takes every ack as raw bytes (`pull.raw_route`),
finds the publish by the number at the end of its reply subject, and resolves that
publish's future. Timeouts are one sweep every `SWEEP_S` over the publishes due by then,
not a timer per publish.

Results and errors are js.publish's: an `Ack` with the stream sequence and the duplicate
flag; an error ack raises nats-py's `APIError` subclass for it (`KeyWrongLastSequenceError`
for a KV compare-and-set that lost, from `update`), no stream raises
`NoStreamResponseError`, no ack in time `nats.errors.TimeoutError`. After a reconnect
nats-py subscribes the inbox again; an ack lost with the old connection is a timeout, and
the caller retries as it did with js.publish.
"""

from __future__ import annotations

import asyncio
import itertools
from typing import Any, NamedTuple

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import ConnectionClosedError
from nats.errors import Error as NatsError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.errors import APIError, KeyWrongLastSequenceError, NoStreamResponseError

from services.common import codec
from services.common.pull import RawSubscription, status_of, subscribe_raw

# nats-py's default JetStream timeout, which every call site used.
ACK_TIMEOUT_S = 5.0
# How often outstanding publishes are checked for their deadline: a timeout is reported
# between its deadline and two sweeps after it.
SWEEP_S = 0.25
# At most this many publishes awaiting their ack (nats-py's default for publish_async).
WINDOW = 4000
# The server's codes for "wrong last sequence": JSStreamWrongLastSequenceErrF and its
# constant form (the ones nats-py's KV turns into KeyWrongLastSequenceError).
WRONG_LAST_SEQUENCE = (10071, 10164)
_NO_RESPONDERS = "503"
_EXPECTED_LAST_SUBJECT_SEQUENCE = "Nats-Expected-Last-Subject-Sequence"
_KV_DELETE = {"KV-Operation": "DEL"}


class Ack(NamedTuple):
    """JetStream's acknowledgement of a publish (what callers used of nats-py's PubAck)."""

    stream: str
    seq: int
    duplicate: bool


def api_error(error: dict[str, Any]) -> APIError:
    """nats-py's exception for the `error` object of a JetStream answer (a subclass per
    HTTP-like code, as js.publish raises)."""
    try:
        APIError.from_error(error)  # raises, it does not return
    except APIError as exc:
        return exc
    return APIError(**error)


def outcome(data: bytes, status: tuple[str, str] | None) -> Ack | NatsError:
    """What a publish's answer means: its Ack, or the error js.publish would raise.
    `status` is the answer's status line (`pull.status_of`), None for a JSON answer."""
    if status is not None:
        code, description = status
        if code == _NO_RESPONDERS:
            return NoStreamResponseError()
        return APIError(code=int(code) if code.isdigit() else None, description=description)
    try:
        answer = codec.loads(data)
        error = answer.get("error")
        if error is not None:
            return api_error(error)
        return Ack(answer["stream"], int(answer["seq"]), bool(answer.get("duplicate", False)))
    except (ValueError, KeyError, TypeError, AttributeError):
        return APIError(description=f"not a JetStream ack: {data[:200]!r}")


def token_of(subject: bytes | str, skip: int) -> int | None:
    """The publish number at the end of a reply subject (`<inbox>.<number>`), after the
    `skip` characters of `<inbox>.`; None for anything else."""
    try:
        return int(subject[skip:])
    except ValueError:
        return None


def kv_subject(bucket: str, key: str) -> str:
    """The subject a KV write of `key` is a publish to (no JetStream domain here)."""
    return f"$KV.{bucket}.{key}"


class JsPublisher:
    """Publishes to JetStream over one connection and hands out the acks. `start` before
    the first publish, `close` before the connection drains.

    `publish` waits for the ack; `send` returns once the message is written, with a future
    of its ack, for many publishes in flight (at most `window`)."""

    def __init__(self, nc: Client, timeout: float = ACK_TIMEOUT_S, window: int = WINDOW) -> None:
        self._nc = nc
        self._timeout = timeout
        self._window = window
        self._prefix = f"{nc.new_inbox()}."
        self._skip = len(self._prefix)
        self._tokens = itertools.count(1)
        self._futures: dict[int, asyncio.Future[Ack]] = {}
        # Sweep number (deadline // SWEEP_S + 1) → the publishes due by then.
        self._due: dict[int, list[int]] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._room = asyncio.Event()
        self._waiting = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sub: RawSubscription | None = None

    @property
    def in_flight(self) -> int:
        return len(self._futures)

    @property
    def raw(self) -> bool:
        """Whether acks come as raw bytes (else through nats-py's `Msg`)."""
        return self._sub is not None and self._sub.raw

    async def start(self, raw: bool = True) -> None:
        """Subscribe the inbox (once; again after `close`)."""
        if self._sub is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._sub = await subscribe_raw(
            self._nc, f"{self._prefix}*", self._on_raw, self._on_msg, raw
        )

    async def close(self) -> None:
        """Stop: publishes still awaiting their ack fail with ConnectionClosedError."""
        sub, self._sub = self._sub, None
        if sub is not None:
            sub.unroute()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        futures, self._futures = self._futures, {}
        self._due.clear()
        for future in futures.values():
            if not future.done():
                future.set_exception(ConnectionClosedError())
        self._room.set()
        if sub is not None:
            await sub.unsubscribe()

    async def send(
        self,
        subject: str,
        payload: bytes = b"",
        headers: dict[str, str] | None = None,
        timeout: float | None = None,
    ) -> asyncio.Future[Ack]:
        """Publish; return the future of its ack once the message is handed to the
        connection (waiting first while `window` publishes are unacknowledged)."""
        while len(self._futures) >= self._window:
            self._waiting = True
            self._room.clear()
            await self._room.wait()
        loop = self._loop
        if loop is None or self._sub is None:
            raise ConnectionClosedError()
        token = next(self._tokens)
        future: asyncio.Future[Ack] = loop.create_future()
        self._futures[token] = future
        due = int((loop.time() + (timeout or self._timeout)) / SWEEP_S) + 1
        tokens = self._due.get(due)
        if tokens is None:
            self._due[due] = [token]
        else:
            tokens.append(token)
        if self._timer is None:
            self._timer = loop.call_later(SWEEP_S, self._sweep)
        try:
            await self._nc.publish(
                subject, payload, reply=f"{self._prefix}{token}", headers=headers
            )
        except BaseException:
            self._futures.pop(token, None)
            raise
        return future

    async def publish(
        self,
        subject: str,
        payload: bytes = b"",
        timeout: float | None = None,
        headers: dict[str, str] | None = None,
    ) -> Ack:
        """Publish and wait for the ack (js.publish's arguments and results)."""
        return await (await self.send(subject, payload, headers, timeout))

    async def update(
        self, subject: str, value: bytes, last: int, timeout: float | None = None
    ) -> int:
        """A KV compare-and-set (`kv.update`; `last` 0: the key must not exist) to the key's
        subject (`kv_subject`); returns the new revision. Raises KeyWrongLastSequenceError
        when the key's revision is not `last`."""
        headers = {_EXPECTED_LAST_SUBJECT_SEQUENCE: str(last)}
        try:
            ack = await self.publish(subject, value, timeout, headers)
        except APIError as exc:
            if exc.err_code in WRONG_LAST_SEQUENCE:
                raise KeyWrongLastSequenceError(description=exc.description) from exc
            raise
        return ack.seq

    async def delete(self, subject: str, timeout: float | None = None) -> None:
        """A KV delete (`kv.delete` without `last`): the key's delete marker."""
        await self.publish(subject, b"", timeout, _KV_DELETE)

    def _on_raw(self, subject: bytes, reply: bytes, data: bytes, headers: bytes | None) -> None:
        self._resolve(subject, data, status_of(headers))

    async def _on_msg(self, msg: Msg) -> None:
        """The same, when nats-py's internals do not allow raw routing (`pull.RAW_ROUTING`)."""
        status = (msg.headers or {}).get("Status")
        described = None if status is None else (status, (msg.headers or {}).get("Description", ""))
        self._resolve(msg.subject, msg.data, described)

    def _resolve(self, subject: bytes | str, data: bytes, status: tuple[str, str] | None) -> None:
        token = token_of(subject, self._skip)
        future = self._futures.pop(token, None) if token is not None else None
        if future is None:
            return  # timed out already (or not ours)
        if not future.done():  # the caller may have been cancelled
            result = outcome(data, status)
            if isinstance(result, Ack):
                future.set_result(result)
            else:
                future.set_exception(result)
        self._made_room()

    def _sweep(self) -> None:
        assert self._loop is not None
        now = int(self._loop.time() / SWEEP_S)
        for due in [due for due in self._due if due <= now]:
            for token in self._due.pop(due):
                future = self._futures.pop(token, None)
                if future is not None and not future.done():
                    future.set_exception(NatsTimeoutError())
        if self._futures:
            self._timer = self._loop.call_later(SWEEP_S, self._sweep)
        else:
            self._timer = None
            self._due.clear()
        self._made_room()

    def _made_room(self) -> None:
        if self._waiting and len(self._futures) < self._window:
            self._waiting = False
            self._room.set()

"""After a test that ran the stack, every message left in the public and internal streams
is checked against its schema in `schemas/`: the status events, log chunks and submissions
the services wrote, and the runner registrations in KV. A test that injects malformed
messages on purpose says so with `@pytest.mark.bad_messages`."""

from __future__ import annotations

import contextlib

import nats
from nats.js.errors import NotFoundError

from services.common import schemas
from services.common.config import Settings


async def problems(settings: Settings) -> list[str]:
    s = settings.subjects
    found: list[str] = []
    nc = await nats.connect(settings.nats_servers)
    try:
        js = nc.jetstream()
        for stream, schema in (
            (s.submit_stream, "submit_message"),
            (s.events_stream, "job_event"),
            (s.logs_stream, "log_chunk"),
            (s.dispatch_stream, "dispatch"),
            (s.reports_stream, "report"),
        ):
            try:
                state = (await js.stream_info(stream)).state
            except NotFoundError:
                continue
            if state.messages == 0:
                continue
            for seq in range(max(1, state.first_seq), state.last_seq + 1):
                try:
                    msg = await js.get_msg(stream, seq)
                except NotFoundError:
                    continue  # deleted (acked from a work queue, or purged)
                try:
                    schemas.decode(schema, msg.data or b"")
                except schemas.SchemaError as exc:
                    found.append(f"{stream} #{seq} ({msg.subject}): {exc}")
        with contextlib.suppress(NotFoundError, Exception):
            kv = await js.key_value(s.runners_bucket)
            for key in await kv.keys():
                entry = await kv.get(key)
                try:
                    schemas.decode("runner_registration", entry.value or b"")
                except schemas.SchemaError as exc:
                    found.append(f"KV {s.runners_bucket}/{key}: {exc}")
    finally:
        await nc.close()
    return found

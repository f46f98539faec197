"""A scheduler and a runner started before NATS wait for it, then for the streams only a
gateway makes, and then start by themselves (under `xoogify up` or a plain supervisor
nothing would restart them if they gave up); a SIGTERM while they wait stops them at
once."""

from __future__ import annotations

import asyncio
import dataclasses
import signal
from pathlib import Path

import nats

from services.common.config import Settings
from services.common.embedded import EmbeddedNats, free_port
from tests.stack import Stack
from tests.support import eventually


def waiting_for_nats(stack: Stack, name: str) -> bool:
    """nats-py's connect retries by itself (and says so through the error callback);
    what comes after it retries in `bus.until_done`."""
    logs = stack.logs(name)
    return '"msg":"nats error"' in logs or '"msg":"nats not ready; retrying"' in logs


async def start_both_waiting(stack: Stack) -> None:
    """A scheduler and a runner, started with no NATS to connect to, and waiting for it."""
    await stack.start_scheduler()
    await stack.start_runner("runner-late")

    async def both_waiting() -> bool:
        return all(waiting_for_nats(stack, n) for n in ("scheduler", "runner-late"))

    await eventually(both_waiting, timeout=30)


async def test_scheduler_and_runner_wait_for_nats(settings: Settings, tmp_path: Path) -> None:
    port = free_port()
    late = dataclasses.replace(settings, nats_url=f"nats://127.0.0.1:{port}")
    stack = Stack(late, tmp_path / "logs")
    server = EmbeddedNats(tmp_path / "late-nats", port=port, log_file=tmp_path / "late.log")
    try:
        await start_both_waiting(stack)
        server.start()

        async def waiting_for_the_gateway() -> bool:
            waiting = "waiting for a gateway to make"
            return all(waiting in stack.logs(n) for n in ("scheduler", "runner-late"))

        await eventually(waiting_for_the_gateway, timeout=60)
        await stack.start_gateway()

        async def registered() -> bool:
            nc = await nats.connect(late.nats_servers)
            try:
                kv = await nc.jetstream().key_value(late.subjects.runners_bucket)
                return (await kv.get("runner-late")).value is not None
            except Exception:
                return False
            finally:
                await nc.close()

        async def leads() -> bool:
            return '"msg":"scheduler leads"' in stack.logs("scheduler")

        await eventually(registered, timeout=60)
        await eventually(leads, timeout=60)
        assert all(p.poll() is None for p in stack.procs.values())
    finally:
        await stack.stop_all()
        server.stop()


async def test_sigterm_while_waiting_for_nats(settings: Settings, tmp_path: Path) -> None:
    late = dataclasses.replace(settings, nats_url=f"nats://127.0.0.1:{free_port()}")
    stack = Stack(late, tmp_path / "logs")
    try:
        await start_both_waiting(stack)
        for name in ("scheduler", "runner-late"):
            stack.procs[name].send_signal(signal.SIGTERM)
        codes = await asyncio.wait_for(
            asyncio.gather(*(asyncio.to_thread(p.wait) for p in stack.procs.values())), 10
        )
        assert codes == [0, 0], {n: stack.logs(n)[-2000:] for n in stack.procs}
    finally:
        await stack.stop_all()

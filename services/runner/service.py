"""The runner service: registers itself, heartbeats, pulls and runs jobs one at a time,
and drains on SIGTERM/SIGINT (stop pulling, say `draining`, let the job finish until the
drain deadline, then cancel it, report, leave the registry, drain NATS)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import signal
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from nats.aio.client import Client
from nats.errors import Error as NatsError

from services.common import bus, crypto
from services.common.children import forbid_inspection
from services.common.config import Settings
from services.common.jspub import JsPublisher
from services.common.metrics import serve_metrics
from services.runner import process
from services.runner.executors import EXECUTORS
from services.runner.registry import HeartbeatLost, Registry
from services.runner.work import Worker
from services.runner.workdir import work_root_from_env

log = logging.getLogger(__name__)

_ARCH_ALIASES = {"x86_64": "amd64", "aarch64": "arm64"}
DEFAULT_DRAIN_TIMEOUT_S = 60.0


def normalize_arch(arch: str) -> str:
    """The contract's name for an architecture (x86_64 → amd64, aarch64 → arm64)."""
    arch = arch.strip().lower()
    return _ARCH_ALIASES.get(arch, arch)


def default_runner_id() -> str:
    return f"runner-{secrets.token_hex(4)}"


def drain_timeout_from_env(env: Mapping[str, str] | None = None) -> float:
    value = (os.environ if env is None else env).get("XOOGIFY_DRAIN_TIMEOUT_S")
    return float(value) if value else DEFAULT_DRAIN_TIMEOUT_S


def runnable_kinds(kinds: list[str]) -> list[str]:
    """The asked-for kinds this runner has an executor for, in order, without repeats."""
    usable: list[str] = []
    for kind in kinds:
        if kind not in EXECUTORS:
            log.warning("no executor for this kind; not taking its jobs", extra={"kind": kind})
        elif kind not in usable:
            usable.append(kind)
    if not usable:
        raise ValueError(f"none of the kinds {kinds} can run here (have: {sorted(EXECUTORS)})")
    return usable


class RunnerService:
    """One runner. `serve()` runs until `stop()` (then drains) or until its heartbeat dies
    (then it raises: a runner that cannot heartbeat must not pretend to be alive)."""

    def __init__(
        self,
        settings: Settings,
        arch: str,
        kinds: list[str],
        labels: dict[str, str] | None = None,
        runner_id: str | None = None,
        drain_timeout_s: float = DEFAULT_DRAIN_TIMEOUT_S,
        work_root: Path | None = None,
    ) -> None:
        self.settings = settings
        self.arch = normalize_arch(arch)
        self.kinds = runnable_kinds(kinds)
        self.labels = dict(labels or {})
        self.runner_id = runner_id or default_runner_id()
        self.drain_timeout_s = drain_timeout_s
        self.work_root = work_root
        self.ready = asyncio.Event()
        # Set by the first stop(); it also ends the start-up retries.
        self._stopping = asyncio.Event()
        self._worker: Worker | None = None
        self._registry: Registry | None = None
        self._background: set[asyncio.Task[None]] = set()

    @property
    def healthy(self) -> bool:
        return self.ready.is_set()

    def stop(self) -> None:
        """Begin the drain (safe to call from a signal handler). A second call ends the
        running job now instead of at the drain deadline."""
        if self._stopping.is_set():
            if self._worker is not None:
                log.info("second stop request: cancelling the running job now")
                self._worker.request_stop()
            return
        self._stopping.set()
        log.info("drain requested", extra={"runner_id": self.runner_id})
        if self._worker is not None:
            self._worker.request_stop()
        if self._registry is not None:
            registry = self._registry
            task = asyncio.create_task(registry.set_state("draining", registry.current_build_id))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def serve(self) -> None:
        name, stopping = f"runner {self.runner_id}", self._stopping
        nc = await bus.until_done("connect", lambda: bus.connect(self.settings, name), stopping)
        if nc is None:
            return
        pub = JsPublisher(nc)
        try:
            await pub.start()
            await self._serve(nc, pub)
        finally:
            await pub.close()
            await _drain(nc)

    async def _serve(self, nc: Client, pub: JsPublisher) -> None:
        settings = self.settings
        js = nc.jetstream()

        async def set_up() -> Any:
            await bus.ensure_streams(js, settings, waits_for=(settings.subjects.logs_stream,))
            return await bus.ensure_kv(
                js,
                settings.subjects.runners_bucket,
                ttl=3 * settings.heartbeat_s,
                replicas=settings.stream_replicas,
            )

        kv = await bus.until_done("streams and registry bucket", set_up, self._stopping)
        if kv is None:
            return  # stopped before it ever registered
        registry = Registry(
            kv, self.runner_id, self.arch, self.kinds, self.labels, settings.heartbeat_s
        )
        worker = Worker(nc, js, pub, settings, registry, self.drain_timeout_s, self.work_root)

        async def register() -> bool:
            # On a cluster just started, the bucket and the dispatch stream may still be
            # electing leaders although they exist: their first write or consumer times out.
            await registry.put()
            await worker.subscribe()
            return True

        if not await bus.until_done("registration and consumers", register, self._stopping):
            await registry.remove()  # stopped first; a put may have landed
            return
        registry.on_written_off = worker.written_off
        self._registry, self._worker = registry, worker
        log.info(
            "runner registered",
            extra={"runner_id": self.runner_id, "arch": self.arch, "kinds": ",".join(self.kinds)},
        )
        if self._stopping.is_set():  # a signal came while connecting
            self._stopping.clear()
            self.stop()
        self.ready.set()
        try:
            async with asyncio.TaskGroup() as tg:
                heartbeat = tg.create_task(registry.heartbeat_forever())
                await worker.run()
                heartbeat.cancel()
        except* HeartbeatLost as group:
            log.critical("heartbeat lost; stopping", extra={"error": str(group.exceptions[0])})
            raise
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        await registry.remove()
        log.info("runner stopped", extra={"runner_id": self.runner_id, "jobs": worker.jobs_run})


async def _drain(nc: Client) -> None:
    """Drain NATS (flushes what is queued); just close if the connection is already gone."""
    if nc.is_closed:
        return
    if nc.is_connected:
        try:
            await nc.drain()
            return
        except (NatsError, TimeoutError, OSError) as exc:
            log.warning("nats drain failed", extra={"error": repr(exc)})
    with contextlib.suppress(NatsError, TimeoutError, OSError):
        await nc.close()


async def run(
    settings: Settings,
    arch: str,
    kinds: list[str],
    labels: dict[str, str],
    metrics_port: int | None,
    runner_id: str | None,
) -> None:
    """Entry point of `xoogify runner`: serve until SIGTERM/SIGINT, then drain and return."""
    # A runner that could not open a job's sensitive values would fail it: refuse to start
    # instead (SecretsError names the setting).
    crypto.Opener(settings.secrets_private_key)
    # The private key is in this process's environment and memory; the jobs it runs are
    # processes of the same user.
    forbid_inspection()
    work_root = work_root_from_env()
    if work_root is not None:
        # Now rather than at the first job: a runner that cannot make work dirs would fail
        # every job it takes.
        work_root.mkdir(parents=True, exist_ok=True)
    service = RunnerService(
        settings,
        arch,
        kinds,
        labels,
        runner_id,
        drain_timeout_s=drain_timeout_from_env(),
        work_root=work_root,
    )
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, service.stop)
    metrics = None
    if metrics_port is not None:
        metrics = await serve_metrics(
            metrics_port, lambda: service.healthy, host=settings.metrics_host
        )
    # Now rather than at the first job, which would wait for it. Closed only after serve()
    # returned: every job has ended and told it so, and it kills nothing.
    process.start_reaper()
    try:
        await service.serve()
    finally:
        process.close_reaper()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        if metrics is not None:
            metrics.close()
            await metrics.wait_closed()

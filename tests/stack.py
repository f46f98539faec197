"""Start the services as real processes for integration tests, wait until they answer, and
kill or restart them to inject faults. Their structured logs go to files under the test's
tmp dir, which a failing test prints."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import httpx

from services.common.children import pdeathsig_preexec
from services.common.config import Settings

KEY_VARIABLES = ("XOOGIFY_SECRETS_PUBLIC_KEY", "XOOGIFY_SECRETS_PRIVATE_KEY", "XOOGIFY_STATE_KEY")


def role_keys(settings: Settings, role: str) -> dict[str, str]:
    """Only the keys a service of this role holds (as `xoogify up` hands them out): the
    gateway seals and keeps state, runners open, the scheduler holds none."""
    if role == "gateway":
        return {
            "XOOGIFY_SECRETS_PUBLIC_KEY": settings.secrets_public_key,
            "XOOGIFY_STATE_KEY": settings.state_key,
        }
    if role == "runner":
        return {"XOOGIFY_SECRETS_PRIVATE_KEY": settings.secrets_private_key}
    return {}


def settings_env(settings: Settings, role: str | None = None) -> dict[str, str]:
    """The environment of a service process; with a `role`, only that role's keys (no role:
    every key, for a caller that does not say what it starts)."""
    env = dict(os.environ)
    env.update(
        {
            "XOOGIFY_NATS_URL": settings.nats_url,
            "XOOGIFY_DATABASE_URL": settings.database_url,
            "XOOGIFY_GATEWAY_URL": settings.gateway_url,
            "XOOGIFY_MODULES_DIR": str(settings.modules_dir),
            "XOOGIFY_SUBJECT_PREFIX": settings.subjects.prefix,
            "XOOGIFY_HEARTBEAT_S": str(settings.heartbeat_s),
            "XOOGIFY_CANCEL_GRACE_S": str(settings.cancel_grace_s),
            "XOOGIFY_QUEUE_TIMEOUT_S": str(settings.queue_timeout_s),
            "XOOGIFY_LOG_CAP_BYTES": str(settings.log_cap_bytes),
            "XOOGIFY_INGEST_LINGER_S": str(settings.ingest_linger_s),
            "XOOGIFY_STATE_SECRET": settings.state_secret,
            "XOOGIFY_STREAM_REPLICAS": str(settings.stream_replicas),
            "XOOGIFY_LEADER_TTL_S": str(settings.leader_ttl_s),
            # Short drains keep teardown quick; a test may pass its own.
            "XOOGIFY_DRAIN_TIMEOUT_S": "5",
        }
    )
    for name in KEY_VARIABLES:
        env.pop(name, None)
    if role is None:
        env.update({**role_keys(settings, "gateway"), **role_keys(settings, "runner")})
    else:
        env.update(role_keys(settings, role))
    if settings.tf_plugin_mirror:
        env["XOOGIFY_TF_PLUGIN_MIRROR"] = str(settings.tf_plugin_mirror)
    if settings.token:
        env["XOOGIFY_TOKEN"] = settings.token
    return env


@dataclass
class Stack:
    settings: Settings
    log_dir: Path
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def gateway_port(self) -> int:
        return int(urlparse(self.settings.gateway_url).port or 80)

    @property
    def url(self) -> str:
        return self.settings.gateway_url

    @property
    def ws_url(self) -> str:
        return self.settings.gateway_url.replace("http://", "ws://") + "/ws"

    def env(self, role: str | None = None, **extra: str) -> dict[str, str]:
        env = settings_env(self.settings, role)
        env.update(extra)
        return env

    def spawn(self, name: str, args: list[str], **extra_env: str) -> subprocess.Popen[bytes]:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        out = open(self.log_dir / f"{name}.log", "ab")
        proc = subprocess.Popen(
            [sys.executable, "-m", "services.cli.main", *args],
            env=self.env(args[0], **extra_env),
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=pdeathsig_preexec,
        )
        out.close()  # the child has its own copy
        self.procs[name] = proc
        return proc

    async def start_gateway(
        self,
        name: str = "gateway",
        port: int | None = None,
        gateway_id: str | None = None,
        **extra_env: str,
    ) -> None:
        """The gateway on the settings' port, or a replica on its own `port` with its own
        `gateway_id` (its ingestion consumers)."""
        args = ["gateway", "--port", str(port or self.gateway_port)]
        if gateway_id is not None:
            args += ["--gateway-id", gateway_id]
        self.spawn(name, args, **extra_env)
        await self.wait_ready(url=f"http://127.0.0.1:{port}" if port else None)

    async def start_scheduler(
        self, name: str = "scheduler", metrics_port: int | None = None, **extra_env: str
    ) -> None:
        args = ["scheduler"]
        if metrics_port is not None:
            args += ["--metrics-port", str(metrics_port)]
        self.spawn(name, args, **extra_env)

    async def start_runner(
        self,
        name: str = "runner",
        arch: str = "amd64",
        kinds: str = "script,terraform",
        **extra_env: str,
    ) -> None:
        args = ["runner", "--arch", arch, "--kinds", kinds, "--runner-id", name]
        self.spawn(name, args, **extra_env)

    async def start_all(self, runners: int = 1) -> None:
        await self.start_gateway()
        await self.start_scheduler()
        for i in range(runners):
            await self.start_runner(f"runner-{i + 1}")

    async def wait_ready(self, timeout: float = 30.0, url: str | None = None) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        async with httpx.AsyncClient() as client:
            while True:
                try:
                    r = await client.get(f"{url or self.url}/readyz", timeout=1.0)
                    if r.status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                if asyncio.get_running_loop().time() > deadline:
                    raise TimeoutError(f"gateway not ready in {timeout}s; see {self.log_dir}")
                await asyncio.sleep(0.05)

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        proc = self.procs[name]
        proc.send_signal(sig)
        proc.wait(30)

    async def stop(self, name: str, timeout: float = 20.0) -> int:
        proc = self.procs.pop(name)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.to_thread(proc.wait, timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                await asyncio.to_thread(proc.wait, 5)
        return proc.returncode

    async def stop_all(self) -> None:
        for name in list(self.procs):
            await self.stop(name)

    def logs(self, name: str) -> str:
        path = self.log_dir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def failure_report(self, lines: int = 12, width: int = 400) -> str:
        """What each service said last that was not `info`, and whether it is still
        running: printed when a test fails, because CI shows the output, not the files."""
        parts = []
        for path in sorted(self.log_dir.glob("*.log")):
            proc = self.procs.get(path.stem)
            state = "stopped by the test" if proc is None else f"exit code {proc.poll()}"
            notable = [
                line[:width]
                for line in path.read_text(errors="replace").splitlines()
                if '"level":"info"' not in line
            ]
            parts.append(f"--- {path.stem} ({state}), last of {len(notable)} non-info lines:")
            parts += notable[-lines:]
        return "\n".join(parts)

"""`xoogify up`: the whole stack on this machine, supervised.

Embedded NATS and Postgres (unless `XOOGIFY_NATS_URL` / `XOOGIFY_DATABASE_URL` are set),
then the gateway, the scheduler and one runner per architecture as child processes. A child
that dies is restarted; Ctrl-C (or SIGTERM) stops every child, then the servers, and leaves
no process behind.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from services.common import nats_auth
from services.common.children import pdeathsig_preexec
from services.common.config import Settings
from services.common.crypto import generate_sealing_pair, generate_state_key
from services.common.embedded import EmbeddedNats, EmbeddedPostgres
from services.common.terraform_tools import build_provider_mirror
from services.gateway import store_reset, token_store

# Runners drain their job for up to DRAIN_S, then cancel it; the rest stop at once.
DRAIN_S = 10
STOP_DEADLINE_S = DRAIN_S + 20.0


@dataclass
class Child:
    name: str
    args: list[str]
    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = 0

    def start(self) -> None:
        out = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "services.cli.main", *self.args],
            env=self.env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=pdeathsig_preexec,
        )
        out.close()


@dataclass
class Supervisor:
    children: list[Child] = field(default_factory=list)
    stopping: bool = False

    async def watch(self) -> None:
        """Restart a child that died on its own (with a pause that grows), until stopping."""
        while not self.stopping:
            for child in self.children:
                proc = child.proc
                if proc is not None and proc.poll() is not None and not self.stopping:
                    child.restarts += 1
                    print(
                        f"xoogify: {child.name} exited with {proc.returncode}; restarting "
                        f"(see {child.log_path})",
                        file=sys.stderr,
                    )
                    await asyncio.sleep(min(10.0, 0.5 * child.restarts))
                    if not self.stopping:
                        child.start()
            await asyncio.sleep(0.5)

    async def stop(self) -> None:
        self.stopping = True
        # Runners first (they drain their jobs), then the scheduler, then the gateway.
        for child in reversed(self.children):
            if child.proc is not None and child.proc.poll() is None:
                child.proc.send_signal(signal.SIGTERM)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + STOP_DEADLINE_S
        for child in reversed(self.children):
            proc = child.proc
            if proc is None:
                continue
            remaining = max(0.1, deadline - loop.time())
            try:
                await asyncio.to_thread(proc.wait, remaining)
            except subprocess.TimeoutExpired:
                proc.kill()
                await asyncio.to_thread(proc.wait, 5)


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


async def _wait_ready(url: str, timeout: float, supervisor: Supervisor) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    async with httpx.AsyncClient() as client:
        while loop.time() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if (await client.get(f"{url}/readyz", timeout=1.0)).status_code == 200:
                    return
            if supervisor.stopping:
                return
            await asyncio.sleep(0.1)
    raise TimeoutError(f"the gateway was not ready within {timeout:.0f}s")


async def _demo(url: str, token: str | None, arches: list[str]) -> None:
    from services.client import XoogifyClient

    async with XoogifyClient(url, token) as xo:
        arch = arches[0]
        for org, env, module, action in [
            ("acme", "stg", "hello", "APPLY-AUTO"),
            ("acme", "prod", "hello", "PLAN"),
            ("globex", "aws-poc-test", "broken", "APPLY-AUTO"),
            ("globex", "stg", "hello", "DESTROY"),
        ]:
            job = await xo.submit(
                organization=org,
                environment=env,
                module_name=module,
                module_type=f"{arch}/script",
                action=action,
            )
            print(f"xoogify: demo job {job['build_id']} ({org}/{env} {module} {action})")


def _persistent_secret(path: Path) -> str:
    """A random secret kept in the data dir, so a restart keeps issued credentials valid."""
    if not path.exists():
        path.write_text(secrets.token_hex(32))
        path.chmod(0o600)
    return path.read_text().strip()


async def _start_nats(
    data_dir: Path, logs_dir: Path, settings: Settings, orgs: list[str]
) -> tuple[EmbeddedNats, dict[str, str]]:
    """The embedded NATS with a user per role; passwords kept in the data dir (0600)."""
    passwords = nats_auth.load_or_create_passwords(
        data_dir / "nats-users.json", nats_auth.users_for(orgs)
    )
    config = data_dir / "nats.conf"
    nats_auth.write_server_config(config, nats_auth.server_config(settings.subjects, passwords))
    server = EmbeddedNats(
        data_dir / "nats", log_file=logs_dir / "nats-server.log", config_file=config
    )
    await asyncio.to_thread(server.start)
    urls = {user: nats_auth.user_url(server.url, user, pw) for user, pw in passwords.items()}
    # Before any service publishes, so its sequences match the services' events stream.
    await nats_auth.ensure_subscriber_stream(urls[nats_auth.SUBSCRIBERS_ADMIN], settings)
    return server, urls


PUBLIC_KEY = "XOOGIFY_SECRETS_PUBLIC_KEY"
PRIVATE_KEY = "XOOGIFY_SECRETS_PRIVATE_KEY"
STATE_KEY = "XOOGIFY_STATE_KEY"


def _write_key(path: Path, value: str) -> None:
    """Mode 0600 from the first byte: never readable by others, not even for a moment."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(value + "\n")


def _role_keys(data_dir: Path, env: dict[str, str]) -> dict[str, dict[str, str]]:
    """The keys each role may hold (docs/security.md, "Secrets"): the gateway seals with the
    public key and keeps state with the state key; runners open with the private key; the
    scheduler holds none. Taken from the environment when given, else generated once into
    the data dir."""
    private, public = env.pop(PRIVATE_KEY, ""), env.pop(PUBLIC_KEY, "")
    if not (private and public):
        private_file, public_file = (
            data_dir / "secrets-private.key",
            data_dir / "secrets-public.key",
        )
        if not private_file.exists():
            new_private, new_public = generate_sealing_pair()
            _write_key(public_file, new_public)  # first: a private key file implies its pair
            _write_key(private_file, new_private)
        private, public = private_file.read_text().strip(), public_file.read_text().strip()
    state = env.pop(STATE_KEY, "")
    if not state:
        state_file = data_dir / "state.key"
        if not state_file.exists():
            _write_key(state_file, generate_state_key())
        state = state_file.read_text().strip()
    return {
        "gateway": {PUBLIC_KEY: public, STATE_KEY: state},
        "scheduler": {},
        "runner": {PRIVATE_KEY: private},
    }


def _role_env(
    env: dict[str, str], nats_urls: dict[str, str], keys: dict[str, dict[str, str]], role: str
) -> dict[str, str]:
    """A child's environment: its own NATS credentials (when we generated them) and only
    the keys its role may hold."""
    child = {**env, **keys[role]}
    if role in nats_urls:
        child["XOOGIFY_NATS_URL"] = nats_urls[role]
    return child


async def _run(args: argparse.Namespace, settings: Settings) -> int:
    data_dir = Path(args.data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    # Postgres may run as an unprivileged user (when we are root): it must reach the dir.
    with contextlib.suppress(OSError):
        os.chmod(data_dir, 0o755)
    logs_dir = data_dir / "logs"
    logs_dir.mkdir(exist_ok=True)
    if not _port_free(args.host, args.port):
        print(f"xoogify: port {args.port} on {args.host} is taken; use --port", file=sys.stderr)
        return 2

    nats: EmbeddedNats | None = None
    postgres: EmbeddedPostgres | None = None
    supervisor = Supervisor()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        nats_url = os.environ.get("XOOGIFY_NATS_URL")
        orgs = [o.strip() for o in (getattr(args, "orgs", None) or "").split(",") if o.strip()]
        # Per-role NATS URLs (docs/security.md); empty with an external NATS, left as is.
        nats_urls: dict[str, str] = {}
        if not nats_url:
            nats, nats_urls = await _start_nats(data_dir, logs_dir, settings, orgs)
            nats_url = nats.url
        database_url = os.environ.get("XOOGIFY_DATABASE_URL")
        if not database_url:
            postgres = EmbeddedPostgres(data_dir / "postgres", log_file=logs_dir / "postgres.log")
            await asyncio.to_thread(postgres.start)
            database_url = postgres.url
        # The admin token behind the login URL printed below (kept across restarts).
        await token_store.ensure_admin_token_file(database_url, data_dir / "admin-token")
        if nats_urls:
            admin = nats_urls[nats_auth.SUBSCRIBERS_ADMIN]
            await store_reset.align_subscribers(admin, settings, database_url)
        url = f"http://{args.host}:{args.port}"
        env = dict(os.environ)
        env.setdefault("XOOGIFY_STATE_SECRET", _persistent_secret(data_dir / "state-secret"))
        env.setdefault("XOOGIFY_DRAIN_TIMEOUT_S", str(DRAIN_S))
        keys = _role_keys(data_dir, env)
        if not env.get("XOOGIFY_TF_PLUGIN_MIRROR"):
            # Offline Terraform: providers from the installed wheels, as a local mirror.
            mirror = build_provider_mirror(data_dir / "tf-mirror")
            if mirror is not None:
                env["XOOGIFY_TF_PLUGIN_MIRROR"] = str(mirror)
        env.update(
            XOOGIFY_NATS_URL=nats_url,
            XOOGIFY_DATABASE_URL=database_url,
            XOOGIFY_GATEWAY_URL=url,
            XOOGIFY_MODULES_DIR=str(settings.modules_dir),
            XOOGIFY_DATA_DIR=str(data_dir),
        )
        arches = [a.strip() for a in args.runners.split(",") if a.strip()]
        children = [
            Child(
                "gateway",
                ["gateway", "--host", args.host, "--port", str(args.port)],
                _role_env(env, nats_urls, keys, "gateway"),
                logs_dir / "gateway.log",
            )
        ]
        children.append(
            Child(
                "scheduler",
                ["scheduler"],
                _role_env(env, nats_urls, keys, "scheduler"),
                logs_dir / "scheduler.log",
            )
        )
        for arch in arches:
            name = f"runner-{arch}"
            args_ = ["runner", "--arch", arch, "--runner-id", f"{socket.gethostname()[:40]}-{arch}"]
            runner_env = _role_env(env, nats_urls, keys, "runner")
            children.append(Child(name, args_, runner_env, logs_dir / f"{name}.log"))
        supervisor.children = children
        for child in children:
            child.start()
        watcher = asyncio.create_task(supervisor.watch())
        ready = asyncio.create_task(_wait_ready(url, 60.0, supervisor))
        stopped = asyncio.create_task(stop.wait())
        await asyncio.wait({ready, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if ready.done() and ready.exception() is None and not stop.is_set():
            token = None
            token_file = data_dir / "admin-token"
            if token_file.exists():
                token = token_file.read_text().strip()
            login = f"{url}/?token={token}" if token else url
            print(f"xoogify: ready at {url}", flush=True)
            print(f"xoogify: open {login}", flush=True)
            for org in orgs:
                user = nats_auth.subscriber_user(org)
                print(
                    f"xoogify: NATS subscriber for {org}: {nats_urls[user]} "
                    f"(subject {settings.subjects.events_filter(org)}, see docs/security.md)",
                    flush=True,
                )
            print(f"xoogify: logs in {logs_dir}; Ctrl-C stops everything", flush=True)
            if args.demo:
                await _demo(url, token, arches)
            await stopped
        elif ready.done() and ready.exception() is not None:
            print(f"xoogify: {ready.exception()}; see {logs_dir}", file=sys.stderr)
            stop.set()
        ready.cancel()
        stopped.cancel()
        print("xoogify: stopping", file=sys.stderr, flush=True)
        await supervisor.stop()
        watcher.cancel()
        return 0
    finally:
        await supervisor.stop()
        if postgres is not None:
            await asyncio.to_thread(postgres.stop)
        if nats is not None:
            await asyncio.to_thread(nats.stop)


def up(args: argparse.Namespace, settings: Settings) -> int:
    return asyncio.run(_run(args, settings))

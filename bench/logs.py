"""`logs`: one job printing N MB (default 50) → a `/ws` `follow_logs` follower. MB/s as
the follower receives it, and ms from the process's exit to the last byte received.

The job writes its exit moment (`date +%s%N`, after its output) to a file the benchmark
names, so "process exit" is the process's own clock reading, not a guess."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import tempfile
import time
from pathlib import Path

import httpx
from websockets.asyncio.client import connect

from bench.report import Result
from bench.stack import Servers, running_stack
from services.common import codec
from services.common.config import machine_arch

DEFAULT = 50
TINY = 1
MB = 1_000_000
LINE = "0123456789abcdefghijklmnopqrstuvwxyz0123456789abcdefghijklmnopq\n"  # 64 bytes


def biglog_modules(directory: Path) -> Path:
    module = directory / "biglog"
    module.mkdir(parents=True, exist_ok=True)
    command = (
        f'yes {LINE.strip()} | head -c "$XOOGIFY_VAR_bytes"; date +%s%N > "$XOOGIFY_VAR_marker"'
    )
    (module / "module.toml").write_text(f"[script]\nPLAN = '{command}'\n")
    return directory


def expected_digest(size: int) -> str:
    digest = hashlib.sha256()
    whole, rest = divmod(size, len(LINE))
    block = LINE.encode() * 1024
    for _ in range(whole // 1024):
        digest.update(block)
    digest.update(LINE.encode() * (whole % 1024) + LINE.encode()[:rest])
    return digest.hexdigest()


async def run(servers: Servers, size: int) -> Result:
    nbytes = size * MB
    result = Result(
        "logs", size, targets={"mb_per_s": "(none set)", "exit_to_last_byte_ms": "(none set)"}
    )
    with tempfile.TemporaryDirectory(prefix="xoogify-bench-logs-") as tmp:
        modules = biglog_modules(Path(tmp) / "modules")
        marker = Path(tmp) / "exit-ns"
        Path(tmp).chmod(0o777)
        cap = max(64 * 1024 * 1024, 2 * nbytes)
        async with (
            running_stack(
                servers, scheduler=True, runners=1, modules_dir=modules, log_cap_bytes=cap
            ) as bench,
            httpx.AsyncClient(base_url=bench.url, headers=bench.headers, timeout=30) as http,
            connect(
                bench.ws_url, max_size=64 * 1024 * 1024, additional_headers=bench.headers
            ) as ws,
        ):
            assert codec.loads(await ws.recv())["type"] == "hello"
            body = {
                "organization": "bench",
                "environment": "logs",
                "module_type": f"{machine_arch()}/script",
                "module_name": "biglog",
                "action": "PLAN",
                "variables": {"bytes": str(nbytes), "marker": str(marker)},
            }
            submitted = time.perf_counter()
            response = await http.post("/api/jobs", json=body)
            build_id = int(response.json()["build_id"])
            await ws.send(
                codec.dumps_str({"type": "follow_logs", "build_id": build_id, "offset": 0})
            )
            digest = hashlib.sha256()
            pos = gaps = 0
            first = last = None
            last_wall_ns = 0
            end: dict[str, object] = {}
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(120.0, size * 3.0)):
                    async for raw in ws:
                        message = codec.loads(raw)
                        if message.get("type") == "log" and message["build_id"] == build_id:
                            data = message["data"].encode()
                            if message["offset"] != pos:
                                gaps += 1
                            pos = message["offset"] + len(data)
                            digest.update(data)
                            last, last_wall_ns = time.perf_counter(), time.time_ns()
                            first = first or last
                        elif message.get("type") == "log_end":
                            end = message
                            break
            ended = time.perf_counter()
            exit_ns = int(marker.read_text()) if marker.exists() else 0
            if pos != nbytes or not end:
                bench.keep = True
    if first is None or last is None or last == first:
        first, last = submitted, ended
    result.figures.update(
        {
            "mb": size,
            "received_bytes": pos,
            "mb_per_s": pos / MB / (last - first),
            "submit_to_log_end_s": ended - submitted,
            "exit_to_last_byte_ms": (last_wall_ns - exit_ns) / 1e6 if exit_ns else float("nan"),
            "status": str(end.get("status", "none")),
            "gaps": gaps,
            "missing": nbytes - pos,
        }
    )
    if not end:
        result.problem("no log_end received")
    elif end.get("status") != "SUCCESS":
        result.problem(f"log_end status {end.get('status')}")
    if pos != nbytes:
        result.problem(f"received {pos} bytes of {nbytes}")
    elif digest.hexdigest() != expected_digest(nbytes):
        result.problem("the log received differs from what the job printed")
    if gaps:
        result.problem(f"{gaps} frames did not start where the previous one ended")
    if not exit_ns:
        result.problem("the job did not record its exit time")
    result.notes.append("mb_per_s runs from the first to the last log byte received")
    return result

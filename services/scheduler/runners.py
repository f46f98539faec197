"""The scheduler's view of the runner registry (KV `xoogify-runners`): who is alive, of which
arch and kinds. Parsing is pure; reading the bucket is one helper at the edge."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from services.common import schemas
from services.scheduler.jobs import epoch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunnerInfo:
    runner_id: str
    arch: str
    kinds: frozenset[str]
    state: str
    started_at: float | None = None  # when the runner process registered (epoch s)

    def serves(self, arch: str, kind: str) -> bool:
        """Would take a job of arch + kind (a draining runner takes nothing new)."""
        return self.arch == arch and kind in self.kinds and self.state != "draining"


def parse_registration(key: str, data: bytes) -> RunnerInfo | None:
    """A registry value as RunnerInfo; None (and a log line) when it is malformed."""
    try:
        value: dict[str, Any] = schemas.decode("runner_registration", data)
        started = value.get("started_at")
        return RunnerInfo(
            runner_id=key,
            arch=value["arch"],
            kinds=frozenset(value["kinds"]),
            state=value["state"],
            started_at=epoch(started) if started else None,
        )
    except (schemas.SchemaError, ValueError) as exc:
        log.warning("bad runner registration", extra={"runner_id": key, "error": str(exc)})
        return None


async def read_registry(kv: Any) -> dict[str, RunnerInfo]:
    """Every live key of the bucket with its latest value. Expired keys are simply absent
    (expiry may send no watch event), which is why the scheduler sweeps this."""
    watcher = await kv.watchall(ignore_deletes=True)
    found: dict[str, RunnerInfo] = {}
    try:
        while True:
            entry = await watcher.updates(timeout=5.0)
            if entry is None:
                break
            if entry.operation is not None or not entry.value:
                continue
            info = parse_registration(entry.key, entry.value)
            if info is not None:
                found[entry.key] = info
            if not entry.delta:
                break
    finally:
        await watcher.stop()
    return found

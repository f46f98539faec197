"""Settings built once from `XOOGIFY_*` variables and passed in; no module-level globals."""

from __future__ import annotations

import os
import platform
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from services.common.subjects import Subjects

REPO_ROOT = Path(__file__).resolve().parents[2]
SCHEMAS_DIR = REPO_ROOT / "schemas"
WEB_DIR = REPO_ROOT / "web"
EXAMPLE_MODULES_DIR = REPO_ROOT / "examples" / "modules"

DEFAULT_NATS_URL = "nats://127.0.0.1:4222"
DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/xoogify"
DEFAULT_GATEWAY_URL = "http://127.0.0.1:8000"

_ARCH_ALIASES = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}


def machine_arch() -> str:
    """This machine's architecture in the contract's words (x86_64 → amd64, aarch64 → arm64)."""
    raw = platform.machine().lower()
    return _ARCH_ALIASES.get(raw, raw)


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    value = env.get(name)
    return int(value) if value not in (None, "") else default


def _float(env: Mapping[str, str], name: str, default: float) -> float:
    value = env.get(name)
    return float(value) if value not in (None, "") else default


@dataclass(frozen=True)
class Settings:
    """What every service needs to find the others, plus the tunables they share."""

    nats_url: str = DEFAULT_NATS_URL
    database_url: str = DEFAULT_DATABASE_URL
    gateway_url: str = DEFAULT_GATEWAY_URL
    token: str | None = None
    modules_dir: Path = EXAMPLE_MODULES_DIR
    tf_plugin_mirror: Path | None = None
    subjects: Subjects = field(default_factory=Subjects)
    # Retention of the public streams (issue 5): events 30 days, logs 7 days.
    events_max_age_s: int = 30 * 24 * 3600
    logs_max_age_s: int = 7 * 24 * 3600
    # Scheduler: how long a job may wait for a runner of its arch + kind.
    queue_timeout_s: float = 15 * 60
    default_timeout_s: int = 3600
    # Runner: heartbeat interval; the registry TTL is about three of them.
    heartbeat_s: float = 5.0
    cancel_grace_s: float = 10.0
    log_cap_bytes: int = 64 * 1024 * 1024
    # Gateway: how long ingestion waits for more after a batch that is not full (what it
    # stores is that much later in Postgres, and it does a fraction of the work per event).
    ingest_linger_s: float = 0.005
    # Shared by the scheduler (issues per-job Terraform state credentials) and the gateway
    # (checks them); empty means the state backend refuses everyone.
    state_secret: str = ""
    # Secrets (services.common.crypto), base64. The gateway holds the public key (it seals
    # sensitive values, it cannot open them) and the state key(s) (Terraform state at rest);
    # runners hold the private key(s). Comma-separated lists: the first key is current.
    secrets_public_key: str = field(default="", repr=False)
    secrets_private_key: str = field(default="", repr=False)
    state_key: str = field(default="", repr=False)
    # Replicas of every stream and KV bucket: 1 on one server, 3 on a JetStream cluster.
    stream_replicas: int = 1
    # Scheduler leader lease (issue 8): a standby takes over this long after the leader
    # stops renewing; the leader renews three times per TTL.
    leader_ttl_s: float = 6.0
    # Where the scheduler's and runners' /metrics and /healthz listen: loopback unless a
    # scraper on another host (or container) must reach them.
    metrics_host: str = "127.0.0.1"

    @property
    def nats_servers(self) -> list[str]:
        """XOOGIFY_NATS_URL may name several servers of a cluster, comma-separated."""
        return [url.strip() for url in self.nats_url.split(",") if url.strip()]

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        mirror = env.get("XOOGIFY_TF_PLUGIN_MIRROR")
        return cls(
            nats_url=env.get("XOOGIFY_NATS_URL") or DEFAULT_NATS_URL,
            database_url=env.get("XOOGIFY_DATABASE_URL") or DEFAULT_DATABASE_URL,
            gateway_url=(env.get("XOOGIFY_GATEWAY_URL") or DEFAULT_GATEWAY_URL).rstrip("/"),
            token=env.get("XOOGIFY_TOKEN") or None,
            modules_dir=Path(env.get("XOOGIFY_MODULES_DIR") or EXAMPLE_MODULES_DIR),
            tf_plugin_mirror=Path(mirror) if mirror else None,
            subjects=Subjects(env.get("XOOGIFY_SUBJECT_PREFIX") or "xoogify"),
            events_max_age_s=_int(env, "XOOGIFY_EVENTS_MAX_AGE_S", 30 * 24 * 3600),
            logs_max_age_s=_int(env, "XOOGIFY_LOGS_MAX_AGE_S", 7 * 24 * 3600),
            queue_timeout_s=_float(env, "XOOGIFY_QUEUE_TIMEOUT_S", 15 * 60),
            default_timeout_s=_int(env, "XOOGIFY_DEFAULT_TIMEOUT_S", 3600),
            heartbeat_s=_float(env, "XOOGIFY_HEARTBEAT_S", 5.0),
            cancel_grace_s=_float(env, "XOOGIFY_CANCEL_GRACE_S", 10.0),
            log_cap_bytes=_int(env, "XOOGIFY_LOG_CAP_BYTES", 64 * 1024 * 1024),
            ingest_linger_s=_float(env, "XOOGIFY_INGEST_LINGER_S", 0.005),
            state_secret=env.get("XOOGIFY_STATE_SECRET") or "",
            secrets_public_key=env.get("XOOGIFY_SECRETS_PUBLIC_KEY") or "",
            secrets_private_key=env.get("XOOGIFY_SECRETS_PRIVATE_KEY") or "",
            state_key=env.get("XOOGIFY_STATE_KEY") or "",
            stream_replicas=_int(env, "XOOGIFY_STREAM_REPLICAS", 1),
            leader_ttl_s=_float(env, "XOOGIFY_LEADER_TTL_S", 6.0),
            metrics_host=env.get("XOOGIFY_METRICS_HOST") or "127.0.0.1",
        )

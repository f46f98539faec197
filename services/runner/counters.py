"""Prometheus counters of the runner (served on /metrics with `--metrics-port`)."""

from __future__ import annotations

from prometheus_client import Counter

JOBS = Counter(
    "xoogify_runner_jobs_total",
    "Jobs this runner ran to an end, by result (exit-code 0, exit-code, or the reason)",
    ["result"],
)
LOG_BYTES = Counter(
    "xoogify_runner_log_bytes_total", "Bytes of job log published (after masking and cap)"
)
CLAIMS = Counter(
    "xoogify_runner_claims_total", "Claims asked of the scheduler, by answer", ["answer"]
)


def job_result(exit_code: int | None, reason: str | None) -> str:
    if reason is not None:
        return str(reason)
    return "success" if exit_code == 0 else "exit-code"

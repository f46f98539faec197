"""The scheduler's Prometheus counters (rejected messages use the shared REJECTED)."""

from __future__ import annotations

from prometheus_client import Counter

ADMITTED = Counter(
    "xoogify_scheduler_submissions_admitted_total", "Submissions admitted as new jobs"
)
EVENTS = Counter(
    "xoogify_scheduler_events_published_total", "Job status events published", ["status"]
)
CLAIMS = Counter("xoogify_scheduler_claims_total", "Claims answered, by result", ["result"])

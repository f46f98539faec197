"""The scheduler's Prometheus counters (rejected messages use the shared REJECTED)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

ADMITTED = Counter(
    "xoogify_scheduler_submissions_admitted_total", "Submissions admitted as new jobs"
)
EVENTS = Counter(
    "xoogify_scheduler_events_published_total", "Job status events published", ["status"]
)
CLAIMS = Counter("xoogify_scheduler_claims_total", "Claims answered, by result", ["result"])
LEADER = Gauge(
    "xoogify_scheduler_leader", "1 while this scheduler holds the leader lease and acts, else 0"
)
TAKEOVERS = Counter(
    "xoogify_scheduler_leader_takeovers_total", "Times this scheduler became the leader"
)

"""Properties of ingestion's pure part (services/gateway/ingest.py `event_rows`): for any
batch, in any order and with repeats, one job upsert per build carrying its highest `seq`
(one INSERT … ON CONFLICT cannot touch a row twice), every event inserted, and the first
event's variables kept however the batch was collapsed."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from services.gateway.ingest import Decoded, event_rows
from tests.unit.test_gateway_ingest import event

VARIABLES = {"A": "1"}


@st.composite
def batches(draw: st.DrawFn) -> list[Decoded]:
    """Some events of a few jobs (seq 1 carries the variables), shuffled, some repeated,
    each with its own stream sequence."""
    bodies: list[dict[str, Any]] = []
    for build_id in range(1, draw(st.integers(1, 4)) + 1):
        seqs = draw(st.sets(st.integers(1, 6), min_size=1))
        for seq in seqs:
            body = event(build_id, seq)
            if seq == 1:
                body["variables"] = dict(VARIABLES)
            bodies.append(body)
    arrived = draw(st.permutations(bodies + draw(st.lists(st.sampled_from(bodies), max_size=5))))
    return [
        Decoded(i, f"xoogify.events.acme.stg.{b['build_id']}", b, None, b"")
        for i, b in enumerate(arrived, start=1)
    ]


@given(batch=batches())
def test_one_upsert_per_build_with_its_highest_seq(batch: list[Decoded]) -> None:
    upserts, inserts, fills = event_rows(batch)
    bodies = [d.body for d in batch if d.body is not None]
    assert [i[0] for i in inserts] == [b["event_id"] for b in bodies]
    by_build = {u[0]: u for u in upserts}
    assert len(by_build) == len(upserts) == len({b["build_id"] for b in bodies})
    for build_id, row in by_build.items():
        mine = [d for d in batch if d.body is not None and d.body["build_id"] == build_id]
        top = max(d.body["seq"] for d in mine if d.body is not None)
        assert row[11] == top
        # The stream sequence stored with the row is that of a message carrying that seq.
        assert row[17] in {d.stream_seq for d in mine if d.body and d.body["seq"] == top}
        has_first = any(d.body["seq"] == 1 for d in mine if d.body is not None)
        assert row[18] == (VARIABLES if has_first else None)
    assert dict(fills) == {b["build_id"]: VARIABLES for b in bodies if b["seq"] == 1}

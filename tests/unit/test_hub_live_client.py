"""The per-socket bookkeeping of the hub: visibility under a filter, the bounded queue and
resync, at-most-once per stream sequence, and the replay/live hand-over."""

from __future__ import annotations

from typing import Any

import pytest

from services.common import codec
from services.common.filters import JobFilter
from services.common.schemas import SchemaError
from services.gateway.live_client import (
    Item,
    LiveClient,
    ReplayWindow,
    SentSeqs,
    Visibility,
    jobs_frame,
    make_item,
    merge,
)


def job(build_id: int, seq: int, status: str = "IN-PROGRESS", org: str = "acme") -> dict[str, Any]:
    at = "2026-11-24T07:00:00.123Z"
    return {
        "build_id": build_id,
        "organization": org,
        "environment": "stg",
        "module_type": "amd64/script",
        "module_name": "hello",
        "action": "PLAN",
        "status": status,
        "reason": "exit-code" if status == "FAILURE" else None,
        "exit_code": 3 if status == "FAILURE" else None,
        "runner_id": None,
        "queue_position": None,
        "seq": seq,
        "requested_by": "alice",
        "submitted_at": at,
        "started_at": None,
        "finished_at": None,
        "updated_at": at,
        "event_id": f"{build_id}-{seq}",
    }


def item(stream_seq: int, build_id: int = 1, seq: int = 1, **kw: Any) -> Item:
    return make_item(stream_seq, codec.dumps(job(build_id, seq, **kw)))


def test_make_item_adds_stream_seq_and_encodes_once() -> None:
    it = item(7, build_id=3, seq=2)
    assert it.stream_seq == 7 and it.build_id == 3
    assert codec.loads(it.raw)["stream_seq"] == 7


def test_make_item_rejects_a_bad_event() -> None:
    bad = job(1, 1)
    del bad["event_id"]
    with pytest.raises(SchemaError):
        make_item(1, codec.dumps(bad))
    with pytest.raises(SchemaError):
        make_item(1, b"not json")


def test_jobs_frame_is_valid_json_with_every_item() -> None:
    frame = codec.loads(jobs_frame([item(1), item(2, seq=2)]))
    assert frame["type"] == "jobs"
    assert [i["stream_seq"] for i in frame["items"]] == [1, 2]


def test_visibility_sends_the_update_that_takes_a_job_out_then_nothing() -> None:
    vis = Visibility(JobFilter(status="IN-PROGRESS"))
    assert vis.wants(item(1, build_id=1, seq=1))
    assert vis.wants(item(2, build_id=1, seq=2, status="WORKING"))  # leaves the filter
    assert not vis.wants(item(3, build_id=1, seq=3, status="SUCCESS"))
    # A job never sent is not sent when it does not match.
    assert not vis.wants(item(4, build_id=2, seq=2, status="WORKING"))


def test_visibility_forgets_final_jobs() -> None:
    vis = Visibility(JobFilter(organization="acme"))
    vis.wants(item(1, build_id=1))
    assert vis.tracked == {1}
    vis.wants(item(2, build_id=1, seq=2, status="FAILURE"))
    assert vis.tracked == set()
    assert not vis.wants(item(3, build_id=9, org="other"))


def test_every_event_is_queued_in_order_none_merged() -> None:
    client = LiveClient(queue_limit=10)
    for n, status in enumerate(["IN-PROGRESS", "WORKING", "SUCCESS"], start=1):
        client.offer(item(n, build_id=1, seq=n, status=status))
    assert [i.job["status"] for i in client.take()] == ["IN-PROGRESS", "WORKING", "SUCCESS"]
    assert client.take() == []


def test_overflow_drops_the_backlog_asks_resync_and_pauses_until_a_filter() -> None:
    client = LiveClient(queue_limit=3)
    for n in range(1, 5):
        client.offer(item(n, build_id=n))
    assert client.take_resync() == "fell behind: send queue full"
    assert client.take() == []
    client.offer(item(5, build_id=5))
    assert client.take() == []  # paused
    client.set_filter(JobFilter())
    client.offer(item(6, build_id=6))
    assert [i.stream_seq for i in client.take()] == [6]
    # The dropped backlog was never sent, so a replay may send it.
    assert 2 not in client.sent and 6 in client.sent


def test_one_client_overflowing_leaves_another_untouched() -> None:
    slow, fast = LiveClient(queue_limit=2), LiveClient(queue_limit=2)
    for n in range(1, 6):
        slow.offer(item(n, build_id=n))
        fast.offer(item(n, build_id=n))
        assert [i.stream_seq for i in fast.take()] == [n]
    assert slow.resyncs == 1 and fast.resyncs == 0


def test_a_stream_sequence_is_queued_at_most_once() -> None:
    client = LiveClient()
    client.offer(item(1))
    client.offer(item(1))
    assert len(client.take()) == 1
    client.begin_replay()
    assert not client.add_replayed(item(1))


def test_replay_window_cover_everything_after_since_once() -> None:
    window = ReplayWindow(since=10, switch=20)
    covered = [s for s in range(1, 40) if window.in_replay(s) or window.in_live(s)]
    assert covered == list(range(11, 40))
    assert not any(window.in_replay(s) and window.in_live(s) for s in range(1, 40))
    # since beyond the switch: nothing to replay, live after since.
    ahead = ReplayWindow(since=30, switch=20)
    assert not any(ahead.in_replay(s) for s in range(1, 40))
    assert [s for s in range(1, 40) if ahead.in_live(s)] == list(range(31, 40))


def test_merge_has_no_gap_and_no_repeat() -> None:
    # The replay read the stream up to 25 (past the switch, 20); live items buffered from 18.
    replayed = [item(s, build_id=s) for s in range(11, 26)]
    buffered = [item(s, build_id=s) for s in range(18, 31)]
    merged = merge(replayed, buffered, ReplayWindow(since=10, switch=20))
    assert [i.stream_seq for i in merged] == list(range(11, 31))


def test_replay_hand_over_through_the_client() -> None:
    client = LiveClient(queue_limit=100)
    client.offer(item(5, build_id=5))  # sent live before the filter
    assert [i.stream_seq for i in client.take()] == [5]
    client.set_filter(JobFilter())
    client.begin_replay()
    window = ReplayWindow(since=3, switch=8)
    for s in (9, 10):  # live while replaying: buffered
        client.offer(item(s, build_id=s))
    assert client.take() == []
    for s in range(4, 9):
        client.add_replayed(item(s, build_id=s))
    client.end_replay(window)
    # 5 was already sent on this socket: not repeated.
    assert [i.stream_seq for i in client.take()] == [4, 6, 7, 8, 9, 10]


def test_exit_update_is_recognised_across_the_hand_over() -> None:
    client = LiveClient()
    client.set_filter(JobFilter(status="IN-PROGRESS"))
    client.begin_replay()
    client.offer(item(9, build_id=1, seq=2, status="WORKING"))  # buffered, leaves filter
    client.add_replayed(item(4, build_id=1, seq=1))
    client.end_replay(ReplayWindow(since=0, switch=8))
    assert [i.stream_seq for i in client.take()] == [4, 9]


def test_buffer_overflow_during_replay_is_a_resync() -> None:
    client = LiveClient(buffer_limit=2)
    client.begin_replay()
    for s in range(1, 4):
        client.offer(item(s, build_id=s))
    assert client.resync_reason == "fell behind during replay"
    assert not client.replaying and client.buffer == []


def test_sent_seqs_is_bounded() -> None:
    sent = SentSeqs(limit=3)
    for s in range(1, 6):
        sent.add(s)
    assert len(sent) == 3 and 1 not in sent and 5 in sent


def test_take_bounds_a_frame_by_items_and_bytes() -> None:
    client = LiveClient()
    for s in range(1, 11):
        client.offer(item(s, build_id=s))
    size = len(client.queue[0].raw)
    assert len(client.take(max_items=3)) == 3
    assert len(client.take(max_bytes=size * 2 + 1)) == 2
    assert len(client.take(max_bytes=1)) == 1  # a big item still goes, alone
    assert len(client.take()) == 4


def test_sent_seqs_ranges_survive_out_of_order_adds_and_discards() -> None:
    sent = SentSeqs()
    sent.add_many([1, 2, 3, 4])
    sent.add_many([8, 9])
    for s in (6, 5, 7):  # fills the hole between the two ranges, out of order
        sent.add(s)
    assert all(s in sent for s in range(1, 10)) and 10 not in sent and 0 not in sent
    assert len(sent) == 9
    sent.discard(5)  # splits the range
    sent.discard(9)
    sent.discard(1)
    assert [s for s in range(0, 11) if s in sent] == [2, 3, 4, 6, 7, 8]
    assert len(sent) == 6
    sent.add(5)
    assert [s for s in range(0, 11) if s in sent] == [2, 3, 4, 5, 6, 7, 8]


def test_sent_seqs_bound_trims_the_lowest_ranges() -> None:
    sent = SentSeqs(limit=5)
    sent.add_many([1, 2, 3])
    sent.add_many([10, 11, 12, 13])
    assert len(sent) == 5
    assert [s for s in range(0, 15) if s in sent] == [3, 10, 11, 12, 13]


def test_a_flush_is_one_wake_up_and_every_socket_shares_one_frame() -> None:
    everything, filtered = LiveClient(), LiveClient()
    filtered.set_filter(JobFilter(status="WORKING"))
    flush = [
        item(n, build_id=n, seq=2 if n % 2 else 1, status="WORKING" if n % 2 else "IN-PROGRESS")
        for n in range(1, 7)
    ]
    for client in (everything, filtered):
        client.wake.clear()
        client.offer_many(flush)
        assert client.wake.is_set()
    assert [i.stream_seq for i in filtered.take()] == [1, 3, 5]
    taken = everything.take()
    assert [i.stream_seq for i in taken] == list(range(1, 7))
    # A second socket that takes the same items gets the very same frame text.
    other = LiveClient()
    other.offer_many(flush)
    frame = jobs_frame(taken)
    assert jobs_frame(other.take()) is frame
    assert [i["stream_seq"] for i in codec.loads(frame)["items"]] == list(range(1, 7))


def test_a_flush_that_overflows_drops_it_whole() -> None:
    client = LiveClient(queue_limit=4)
    client.offer_many([item(1), item(2, seq=2)])
    client.offer_many([item(n, build_id=n) for n in range(3, 6)])
    assert client.take_resync() == "fell behind: send queue full"
    assert client.take() == [] and 1 not in client.sent


def test_sockets_behind_by_a_flush_still_share_frames() -> None:
    # One socket takes each flush on its own, another (still sending meanwhile) both at
    # once: neither evicts the other's frame, which stays shared with its peers.
    first = [item(n, build_id=n) for n in (1, 2)]
    second = [item(n, build_id=n) for n in (3, 4)]
    both = jobs_frame(first + second)
    one = jobs_frame(first)
    assert jobs_frame(list(first + second)) is both
    assert jobs_frame(list(first)) is one
    # Same count and ends, other items between them (a filtered socket): its own frame.
    middle = [first[0], item(9, build_id=9), second[1]]
    assert codec.loads(jobs_frame(middle))["items"][1]["stream_seq"] == 9


def test_queued_bytes_follow_the_queue() -> None:
    client = LiveClient()
    flush = [item(n, build_id=n) for n in range(1, 6)]
    client.offer_many(flush)
    client.offer(item(6, build_id=6))
    assert client.queued_bytes == sum(len(i.raw) for i in client.queue)
    size = len(flush[0].raw)
    assert len(client.take(max_bytes=size * 2)) == 2
    assert client.queued_bytes == sum(len(i.raw) for i in client.queue)
    assert len(client.take()) == 4 and client.queued_bytes == 0
    client.offer_many([item(7, build_id=7)])
    client.overflow("test")
    assert client.queued_bytes == 0

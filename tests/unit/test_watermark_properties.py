"""Properties of the ingestion watermark (services/gateway/watermark.py): whatever order,
repeats and batching the processed stream sequences come in, and wherever the stream's
retention cuts off its head, the watermark is exactly the end of the contiguous prefix,
never passes a hole and never goes back."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from services.gateway.watermark import Contiguity

seqs = st.integers(min_value=1, max_value=40)
# A step is a batch of processed sequences, or the stream's first still-held sequence.
steps = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.lists(seqs, max_size=8)),
        st.tuples(st.just("skip"), st.integers(min_value=0, max_value=45)),
    ),
    max_size=25,
)


def prefix_end(done: set[int], start: int) -> int:
    """The highest W >= start such that every sequence in start+1..W is done."""
    w = start
    while w + 1 in done:
        w += 1
    return w


@settings(max_examples=400)
@given(start=st.integers(min_value=0, max_value=5), steps=steps)
def test_watermark_is_the_end_of_the_contiguous_prefix(
    start: int, steps: list[tuple[str, object]]
) -> None:
    c = Contiguity(start)
    done: set[int] = set()  # processed, or gone from the stream for good
    for kind, arg in steps:
        before = c.watermark
        if kind == "add":
            assert isinstance(arg, list)
            done.update(arg)
            mark = c.add(arg)
        else:
            assert isinstance(arg, int)
            done.update(range(1, arg))
            mark = c.skip_to(arg)
        expected = prefix_end(done, start)
        assert mark == c.watermark == expected
        assert c.watermark >= before
        # Never past a hole: everything up to the watermark is done.
        assert all(s in done for s in range(start + 1, c.watermark + 1))
        assert c.waiting == len({s for s in done if s > c.watermark})


@given(batches=st.lists(st.lists(seqs, max_size=8), max_size=10))
def test_a_copy_moves_alone(batches: list[list[int]]) -> None:
    c = Contiguity()
    for batch in batches:
        copy = c.copy()
        before = (c.watermark, c.waiting)
        copy.add(batch)
        assert (c.watermark, c.waiting) == before
        c = copy

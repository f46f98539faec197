"""Properties of the log text layer, from the process's bytes to a reader's pages:
masking across piece boundaries (services/runner/masking.py), the runner's chunks
(logpipe.py, logtext.py) and reading stored chunks back by byte offset (gateway
log_text.py). Offsets count bytes of the masked UTF-8 text; no chunk and no page splits a
character; no secret survives, however the output was cut into reads."""

from __future__ import annotations

import itertools
import re
from typing import TypeVar

from hypothesis import given, settings
from hypothesis import strategies as st

from services.gateway.log_text import read_span
from services.runner.logpipe import LogPipe
from services.runner.logtext import split_chunks, utf8_len
from services.runner.masking import MASK, Masker, mask_all

# A small alphabet with 1- to 4-byte characters, so secrets collide with the text often
# and cuts land inside characters. No "*": the mask must not look like text.
T = TypeVar("T", str, bytes)

ALPHABET = "ab\n€😀"
texts = st.text(alphabet=ALPHABET, max_size=60)
secret_sets = st.lists(st.text(alphabet=ALPHABET, min_size=1, max_size=4), max_size=3)


def cuts_of(draw: st.DrawFn, size: int) -> list[int]:
    """Sorted cut points in 0..size (repeats allowed: an empty read)."""
    points = draw(st.lists(st.integers(min_value=0, max_value=size), max_size=8))
    return sorted(points)


def pieces(value: T, cuts: list[int]) -> list[T]:
    bounds = [0, *cuts, len(value)]
    return [value[a:b] for a, b in itertools.pairwise(bounds)]


def masked_at_once(text: str, secrets: list[str]) -> str:
    """The oracle: leftmost match, longest secret first at a position."""
    values = sorted({s for s in secrets if s}, key=len, reverse=True)
    if not values:
        return text
    return re.sub("|".join(re.escape(v) for v in values), MASK, text)


@settings(max_examples=400)
@given(text=texts, secrets=secret_sets, data=st.data())
def test_masking_in_pieces_is_masking_at_once(
    text: str, secrets: list[str], data: st.DataObject
) -> None:
    masker = Masker(secrets)
    hold = max((len(s) for s in secrets), default=1) - 1
    published = ""
    whole = masked_at_once(text, secrets)
    for piece in pieces(text, cuts_of(data.draw, len(text))):
        published += masker.feed(piece)
        # What is out is out: every piece published is the start of the final text.
        assert whole.startswith(published)
        assert len(masker.pending) <= hold
    published += masker.finish()
    assert published == whole == mask_all(text, secrets)
    for secret in secrets:
        assert secret not in published


@settings(max_examples=300)
@given(
    text=texts,
    secrets=secret_sets,
    chunk_bytes=st.integers(min_value=4, max_value=16),
    data=st.data(),
)
def test_runner_chunks_are_contiguous_whole_characters_and_masked(
    text: str, secrets: list[str], chunk_bytes: int, data: st.DataObject
) -> None:
    raw = text.encode()
    pipe = LogPipe(secrets, cap_bytes=1 << 20, chunk_bytes=chunk_bytes)
    chunks = []
    for read in pieces(raw, cuts_of(data.draw, len(raw))):
        pipe.write(read)  # a read may end inside a character
        if data.draw(st.booleans()):
            chunks += pipe.take()
    chunks += pipe.take(eof=True)
    assert pipe.take(eof=True) == []  # nothing after the eof chunk
    offset = 0
    for chunk in chunks:
        assert chunk.offset == offset
        assert utf8_len(chunk.data) <= chunk_bytes
        chunk.data.encode()  # whole characters only: a split one could not encode
        offset += utf8_len(chunk.data)
    assert [c.eof for c in chunks] == [False] * (len(chunks) - 1) + [True]
    assert "".join(c.data for c in chunks) == masked_at_once(text, secrets)


@settings(max_examples=300)
@given(text=st.text(alphabet=ALPHABET, max_size=80), data=st.data())
def test_pages_by_offset_give_the_stored_text_back_whole(text: str, data: st.DataObject) -> None:
    """A reader paging through a stored log with any limit gets exactly the text, each page
    whole characters, each next page starting where the last ended."""
    chunk_bytes = data.draw(st.integers(min_value=4, max_value=20))
    stored, offset = [], 0
    for piece in split_chunks(text, chunk_bytes):
        stored.append((offset, piece))
        offset += utf8_len(piece)
    limit = data.draw(st.integers(min_value=1, max_value=24))
    got, at = b"", 0
    for _ in range(len(text.encode()) + 2):
        start, page = read_span(stored, at, limit)
        assert start == at
        page.decode()  # never a split character
        assert len(page) <= max(limit, 4)
        if not page:
            break
        got += page
        at = start + len(page)
    assert got == text.encode()


@given(text=st.text(alphabet=ALPHABET, min_size=1, max_size=40), data=st.data())
def test_an_offset_inside_a_character_moves_to_the_next_one(text: str, data: st.DataObject) -> None:
    raw = text.encode()
    stored = [(0, text)]
    offset = data.draw(st.integers(min_value=0, max_value=len(raw)))
    start, page = read_span(stored, offset, len(raw) + 4)
    assert start >= offset and start - offset <= 3
    assert raw[start:] == page
    page.decode()


@given(text=st.text(alphabet=ALPHABET, min_size=2, max_size=40), data=st.data())
def test_reading_stops_at_a_missing_chunk(text: str, data: st.DataObject) -> None:
    stored, offset = [], 0
    for piece in split_chunks(text, 4):
        stored.append((offset, piece))
        offset += utf8_len(piece)
    if len(stored) < 2:
        return
    missing = data.draw(st.integers(min_value=0, max_value=len(stored) - 1))
    kept = stored[:missing] + stored[missing + 1 :]
    start, page = read_span(kept, 0, 1 << 20)
    assert (start, page) == (0, text.encode()[: stored[missing][0]])

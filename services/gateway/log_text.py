"""Reading a stored log by byte offsets: the chunks are UTF-8 text with byte offsets, and an
answer never splits a character."""

from __future__ import annotations

from collections.abc import Iterable


def _is_continuation(byte: int) -> bool:
    return byte & 0xC0 == 0x80


def char_boundary_back(data: bytes, end: int) -> int:
    """The largest index ≤ `end` that does not cut a UTF-8 character in `data`."""
    end = min(end, len(data))
    if end == len(data):
        return end
    while end > 0 and _is_continuation(data[end]):
        end -= 1
    return end


def char_boundary_forward(data: bytes, start: int) -> int:
    """The smallest index ≥ `start` that does not cut a UTF-8 character in `data`."""
    while start < len(data) and _is_continuation(data[start]):
        start += 1
    return start


def read_span(chunks: Iterable[tuple[int, str]], offset: int, limit: int) -> tuple[int, bytes]:
    """From chunks `(chunk_offset, text)` in offset order, the bytes from `offset` on, at
    most `limit` of them (or one whole character), stopping at the first gap; returns
    (actual start, bytes).

    The start moves forward to a character boundary if `offset` falls inside a character.
    """
    pieces: list[bytes] = []
    base: int | None = None
    pos = offset
    for chunk_offset, text in chunks:
        data = text.encode()
        end = chunk_offset + len(data)
        if end <= pos:
            continue
        if chunk_offset > pos:
            break  # a gap: the rest is not stored yet
        if base is None:
            base = pos
        pieces.append(data[pos - chunk_offset :])
        pos = end
        if pos - base >= limit + 4:
            break
    if base is None:
        return offset, b""
    joined = b"".join(pieces)
    skip = char_boundary_forward(joined, 0)
    joined = joined[skip:]
    cut = char_boundary_back(joined, limit)
    if cut == 0 and joined:
        # A limit smaller than the first character: give that one character whole (up to
        # 3 bytes over), or a reader paging with such a limit would never move on.
        cut = char_boundary_forward(joined, 1)
    return base + skip, joined[:cut]

"""Reading a stored log by byte offsets without ever splitting a UTF-8 character."""

from __future__ import annotations

from services.gateway.log_text import char_boundary_back, char_boundary_forward, read_span

TEXT = "aé€😀b"  # 1 + 2 + 3 + 4 + 1 bytes


def chunks_of(text: str, sizes: list[int]) -> list[tuple[int, str]]:
    """Split `text` into chunks of about `sizes` bytes each, on character boundaries."""
    data = text.encode()
    out, pos = [], 0
    for size in sizes:
        end = char_boundary_back(data, pos + size)
        out.append((pos, data[pos:end].decode()))
        pos = end
    if pos < len(data):
        out.append((pos, data[pos:].decode()))
    return out


def test_boundaries() -> None:
    data = TEXT.encode()
    assert char_boundary_back(data, 2) == 1  # inside é
    assert char_boundary_back(data, 3) == 3
    assert char_boundary_back(data, 100) == len(data)
    assert char_boundary_forward(data, 4) == 6  # inside €
    assert char_boundary_forward(data, 6) == 6


def test_whole_log_from_zero() -> None:
    start, data = read_span(chunks_of(TEXT, [3, 4]), 0, 1000)
    assert (start, data.decode()) == (0, TEXT)


def test_limit_inside_a_character_stops_before_it() -> None:
    start, data = read_span(chunks_of(TEXT, [3, 4]), 0, 8)  # 😀 spans bytes 6..9
    assert (start, data.decode()) == (0, "aé€")


def test_offset_inside_a_character_moves_to_the_next() -> None:
    start, data = read_span(chunks_of(TEXT, [3, 4]), 7, 100)
    assert (start, data.decode()) == (10, "b")


def test_every_offset_and_limit_yields_whole_characters() -> None:
    chunks = chunks_of(TEXT * 3, [5, 1, 7, 4])
    total = len((TEXT * 3).encode())
    for offset in range(total + 1):
        for limit in range(1, 12):
            start, data = read_span(chunks, offset, limit)
            # At most `limit` bytes, or one whole character when it is bigger than that.
            assert start >= offset and (len(data) <= limit or len(data.decode()) == 1)
            data.decode()  # never a split character
            assert (TEXT * 3).encode()[start : start + len(data)] == data


def test_stops_at_a_gap_and_at_the_end() -> None:
    chunks = [(0, "abc"), (6, "ghi")]  # bytes 3..6 not stored yet
    assert read_span(chunks, 0, 100) == (0, b"abc")
    assert read_span(chunks, 3, 100) == (3, b"")
    assert read_span(chunks, 7, 100) == (7, b"hi")
    assert read_span(chunks, 9, 100) == (9, b"")

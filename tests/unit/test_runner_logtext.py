"""Log text: UTF-8 decoding across reads, chunking on character boundaries, the log cap."""

from __future__ import annotations

import pytest

from services.runner.logtext import (
    CHUNK_BYTES,
    LogCap,
    Utf8Stream,
    prefix_within,
    split_chunks,
    truncation_line,
    utf8_len,
)


def test_multibyte_characters_split_across_reads_at_every_byte() -> None:
    text = "a€b😀c"
    data = text.encode()
    for cut in range(len(data) + 1):
        dec = Utf8Stream()
        assert dec.decode(data[:cut]) + dec.decode(data[cut:]) + dec.finish() == text


def test_one_byte_at_a_time() -> None:
    text = "ñandú 日本語 😀\n"
    dec = Utf8Stream()
    out = "".join(dec.decode(bytes([b])) for b in text.encode()) + dec.finish()
    assert out == text


def test_invalid_bytes_become_replacement_characters() -> None:
    dec = Utf8Stream()
    out = dec.decode(b"ok \xff\xfe x") + dec.finish()
    assert out == "ok \ufffd\ufffd x"


def test_truncated_character_at_end_becomes_replacement() -> None:
    dec = Utf8Stream()
    assert dec.decode("x€".encode()[:-1]) == "x"
    assert dec.finish() == "\ufffd"


def test_chunks_are_at_most_32_kib_and_join_back() -> None:
    text = ("line of log 😀 €\n" * 10_000) + "end"
    pieces = split_chunks(text)
    assert len(pieces) > 1
    assert all(0 < utf8_len(p) <= CHUNK_BYTES for p in pieces)
    assert "".join(pieces) == text
    # Every piece is valid UTF-8 on its own: no character was cut.
    for p in pieces:
        assert p.encode().decode() == p


def test_four_byte_character_straddling_the_chunk_boundary() -> None:
    text = "a" * (CHUNK_BYTES - 2) + "😀" + "b"
    pieces = split_chunks(text)
    assert pieces[0] == "a" * (CHUNK_BYTES - 2)
    assert pieces[1] == "😀b"


def test_exactly_one_chunk_and_empty_text() -> None:
    assert split_chunks("x" * CHUNK_BYTES) == ["x" * CHUNK_BYTES]
    assert split_chunks("") == []


def test_prefix_within_never_cuts_a_character() -> None:
    assert prefix_within("€€", 4) == "€"
    assert prefix_within("€€", 2) == ""
    assert prefix_within("abc", 0) == ""


def test_cap_lets_output_through_until_the_cap() -> None:
    cap = LogCap(10)
    assert cap.take("12345") == "12345"
    assert cap.take("6789\n") == "6789\n"
    assert not cap.truncated
    out = cap.take("abc")
    # The output so far ended a line, so the notice needs no newline of its own.
    assert out == truncation_line(10)
    assert cap.truncated
    assert cap.take("more output") == ""


def test_cap_cuts_inside_a_piece_and_starts_the_notice_on_its_own_line() -> None:
    cap = LogCap(8)
    out = cap.take("hello world\n")
    # The newline that ends the cut line counts against the cap.
    assert out == "hello w\n[xoogify] log truncated at 8 bytes; the job goes on\n"
    assert cap.used == 8


def test_cap_counts_bytes_not_characters_and_never_cuts_a_character() -> None:
    cap = LogCap(5)
    out = cap.take("€€")  # 6 bytes: only one € (3 bytes) fits
    assert out.startswith("€\n[xoogify] log truncated at 5 bytes")
    assert cap.used == 4  # the € and the newline before the notice


@pytest.mark.parametrize("cap_bytes", range(1, 24))
@pytest.mark.parametrize("pieces", [["ab", "cd\n", "efgh"], ["abcdefgh\n", "ij\n"], ["x" * 30]])
def test_log_is_never_longer_than_cap_plus_notice(cap_bytes: int, pieces: list[str]) -> None:
    cap = LogCap(cap_bytes)
    out = "".join(cap.take(p) for p in pieces) + cap.take("more\n")
    if cap.truncated:
        notice = truncation_line(cap_bytes)
        assert out.endswith(notice) and out.count(notice) == 1
        assert len(out.encode()) <= cap_bytes + len(notice.encode())
        assert out[: -len(notice)] == "" or out[: -len(notice)].endswith("\n")
    else:
        assert out == "".join(pieces) + "more\n"


def test_truncation_line_wording() -> None:
    line = truncation_line(67108864)
    assert line == "[xoogify] log truncated at 67108864 bytes; the job goes on\n"


@pytest.mark.parametrize("size", [1, 3])
def test_split_chunks_refuses_too_small_chunks(size: int) -> None:
    with pytest.raises(ValueError):
        split_chunks("abc", size)


def test_nul_becomes_replacement_character() -> None:
    # Postgres text cannot hold a NUL: binary output must not make a chunk unstorable.
    stream = Utf8Stream()
    text = stream.decode(b"bin\x00ary\x00") + stream.finish()
    assert text == "bin\ufffdary\ufffd"

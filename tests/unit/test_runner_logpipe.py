"""LogPipe: what the chunks hold and where they start (offsets in bytes after masking)."""

from __future__ import annotations

from services.runner.logpipe import Chunk, LogPipe
from services.runner.logtext import truncation_line


def drain(pipe: LogPipe, eof: bool = False) -> list[Chunk]:
    return pipe.take(eof)


def check_contiguous(chunks: list[Chunk]) -> str:
    offset = 0
    for chunk in chunks:
        assert chunk.offset == offset
        offset += len(chunk.data.encode())
    assert [c.eof for c in chunks].count(True) <= 1
    return "".join(c.data for c in chunks)


def test_offsets_count_utf8_bytes_and_are_contiguous_across_takes() -> None:
    pipe = LogPipe([], cap_bytes=10_000)
    chunks: list[Chunk] = []
    for piece in ("héllo ", "wörld 😀\n", "", "end\n"):
        pipe.write(piece.encode())
        chunks += drain(pipe)
    chunks += drain(pipe, eof=True)
    assert check_contiguous(chunks) == "héllo wörld 😀\nend\n"
    assert chunks[-1] == Chunk(len("héllo wörld 😀\nend\n".encode()), "", True)
    assert pipe.take(eof=True) == []  # nothing after eof


def test_offsets_are_after_masking() -> None:
    pipe = LogPipe(["longsecretvalue"], cap_bytes=10_000)
    pipe.write(b"a longsecretvalue b\n")
    chunks = drain(pipe, eof=True)
    assert check_contiguous(chunks) == "a *** b\n"
    assert chunks[-1].offset + len(chunks[-1].data.encode()) == len(b"a *** b\n")


def test_secret_split_over_writes_is_held_back_not_published_in_part() -> None:
    secret = "hunter2hunter2"
    pipe = LogPipe([secret], cap_bytes=10_000)
    pipe.write(f"pw={secret[:5]}".encode())
    published = "".join(c.data for c in drain(pipe))  # a flush by the clock, mid-secret
    assert "hunte" not in published
    pipe.write(f"{secret[5:]}!\n".encode())
    published += "".join(c.data for c in drain(pipe, eof=True))
    assert published.endswith("pw=***!\n") and secret[:5] not in published


def test_a_note_does_not_cut_a_held_secret_in_two() -> None:
    pipe = LogPipe(["abcdef"], cap_bytes=10_000)
    pipe.write(b"key=abc")
    pipe.note("[xoogify] cancelled: stopping the process")
    pipe.write(b"def\n")
    text = check_contiguous(drain(pipe, eof=True))
    assert "abc" not in text
    # Only "abc" (where the secret may begin) was held; the note is on a line of its own.
    assert text == "key=\n[xoogify] cancelled: stopping the process\n***\n"


def test_chunks_are_cut_at_the_chunk_size() -> None:
    pipe = LogPipe([], cap_bytes=10_000_000, chunk_bytes=1024)
    pipe.write(("é" * 1500).encode())  # 3000 bytes
    assert pipe.full
    chunks = drain(pipe, eof=True)
    assert [len(c.data.encode()) for c in chunks] == [1024, 1024, 952]
    assert check_contiguous(chunks) == "é" * 1500
    assert [c.eof for c in chunks] == [False, False, True]


def test_cap_truncates_with_a_line_and_offsets_stay_contiguous() -> None:
    pipe = LogPipe([], cap_bytes=100)
    chunks: list[Chunk] = []
    for i in range(50):
        pipe.write(f"line {i}\n".encode())
        chunks += drain(pipe)
    pipe.note("[xoogify] a note after the cap still shows")
    chunks += drain(pipe, eof=True)
    text = check_contiguous(chunks)
    kept, notice_and_note = text[:100], text[100:]
    assert len(kept.encode()) == 100
    # The cap fell inside "line 13", so the notice starts a line of its own; that newline
    # counts against the cap.
    assert kept.endswith("line 12\nline \n")
    assert notice_and_note == (
        truncation_line(100) + "[xoogify] a note after the cap still shows\n"
    )
    assert "line 49" not in text


def test_a_note_after_a_complete_line_needs_no_extra_newline() -> None:
    pipe = LogPipe([], cap_bytes=1000)
    pipe.write(b"done\n")
    pipe.note("[xoogify] note")
    assert check_contiguous(drain(pipe, eof=True)) == "done\n[xoogify] note\n"


def test_empty_job_log_is_one_empty_eof_chunk() -> None:
    assert LogPipe([], cap_bytes=10).take(eof=True) == [Chunk(0, "", True)]


def test_invalid_and_split_utf8_in_the_pipe() -> None:
    pipe = LogPipe([], cap_bytes=1000)
    data = "ok €".encode() + b"\xff\n"
    pipe.write(data[:4])  # "ok " + first byte of €
    first = drain(pipe)
    pipe.write(data[4:])
    rest = drain(pipe, eof=True)
    assert check_contiguous(first + rest) == "ok €\ufffd\n"

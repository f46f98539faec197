"""The pure half of log streaming: bytes in; masked, capped chunks with byte offsets out.

`LogStream` (logstream.py) only adds the clock and the publishing, so everything about
what a chunk holds and where it starts is tested here without a server.
"""

from __future__ import annotations

from dataclasses import dataclass

from services.runner.logtext import CHUNK_BYTES, LogCap, Utf8Stream, split_chunks, utf8_len
from services.runner.masking import Masker, mask_all


@dataclass(frozen=True)
class Chunk:
    offset: int
    data: str
    eof: bool


class LogPipe:
    def __init__(self, secrets: list[str], cap_bytes: int, chunk_bytes: int = CHUNK_BYTES) -> None:
        self._secrets = secrets
        self._decoder = Utf8Stream()
        self._masker = Masker(secrets)
        self._cap = LogCap(cap_bytes)
        self._chunk_bytes = chunk_bytes
        self._pending: list[str] = []
        self.pending_bytes = 0
        # Bytes handed out in chunks so far: the offset of the next chunk.
        self.offset = 0
        self.ended = False
        self._at_line_start = True

    def _add(self, text: str) -> None:
        if text:
            self._pending.append(text)
            self.pending_bytes += utf8_len(text)
            self._at_line_start = text.endswith("\n")

    def write(self, data: bytes) -> None:
        """Output of the process, as read."""
        self._add(self._cap.take(self._masker.feed(self._decoder.decode(data))))

    def note(self, line: str) -> None:
        """A line from the runner itself (what it did, why it stopped): after the output
        released so far, masked too, not subject to the cap.

        Output held back (a partial character, the start of a possible secret) stays held
        and follows the note: cutting it off here could print half a secret."""
        start = "" if self._at_line_start else "\n"  # a note is a line of its own
        self._add(start + mask_all(line.rstrip("\n") + "\n", self._secrets))

    @property
    def full(self) -> bool:
        """A whole chunk is waiting: time to publish without waiting for the clock."""
        return self.pending_bytes >= self._chunk_bytes

    def take(self, eof: bool = False) -> list[Chunk]:
        """The chunks ready to publish, in order, each at most `chunk_bytes` bytes. With
        `eof`, the held-back output is released too and the last chunk says eof (its data
        may be empty); nothing comes after it."""
        if self.ended:
            return []
        if eof:
            tail = self._masker.feed(self._decoder.finish()) + self._masker.finish()
            self._add(self._cap.take(tail))
        text = "".join(self._pending)
        self._pending, self.pending_bytes = [], 0
        pieces = split_chunks(text, self._chunk_bytes)
        if eof and not pieces:
            pieces = [""]
        chunks = []
        for i, piece in enumerate(pieces):
            chunks.append(Chunk(self.offset, piece, eof and i == len(pieces) - 1))
            self.offset += utf8_len(piece)
        self.ended = eof
        return chunks

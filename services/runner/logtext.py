"""Pure log text handling: incremental UTF-8 decoding, the per-job size cap, and cutting
text into chunks of at most N bytes without ever splitting a character.

Offsets count bytes of the UTF-8 text after masking, so everything here measures bytes.
"""

from __future__ import annotations

import codecs

CHUNK_BYTES = 32 * 1024


def utf8_len(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


class Utf8Stream:
    """Decode bytes as they are read; a character split across two reads is kept whole,
    and invalid bytes become U+FFFD. So does a NUL: the gateway stores log text in Postgres,
    whose text cannot hold one (binary output would otherwise be unstorable)."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def decode(self, data: bytes) -> str:
        return self._decoder.decode(data).replace("\x00", "\ufffd")

    def finish(self) -> str:
        # A truncated character at the very end becomes U+FFFD.
        return self._decoder.decode(b"", final=True).replace("\x00", "\ufffd")


def prefix_within(text: str, max_bytes: int) -> str:
    """The longest prefix of `text` whose UTF-8 encoding fits in `max_bytes`."""
    if max_bytes <= 0:
        return ""
    encoded = text.encode("utf-8", "surrogatepass")
    if len(encoded) <= max_bytes:
        return text
    # Cut the bytes, then drop a partial character at the end of the cut.
    return encoded[:max_bytes].decode("utf-8", "ignore")


def split_chunks(text: str, max_bytes: int = CHUNK_BYTES) -> list[str]:
    """Cut `text` into pieces of at most `max_bytes` UTF-8 bytes each, on character
    boundaries; the pieces joined give `text` back."""
    if max_bytes < 4:
        raise ValueError("a chunk must hold at least one character (4 bytes)")
    pieces: list[str] = []
    rest = text
    while rest:
        piece = prefix_within(rest, max_bytes)
        pieces.append(piece)
        rest = rest[len(piece) :]
    return pieces


def truncation_line(cap_bytes: int) -> str:
    return f"[xoogify] log truncated at {cap_bytes} bytes; the job goes on\n"


class LogCap:
    """Let through at most `cap_bytes` bytes of output, then one line that says the log
    was truncated, then nothing more of the output.

    The notice starts on a line of its own; a newline put before it to end a cut line
    counts against the cap, so the whole log is never more than the cap plus the notice.
    """

    def __init__(self, cap_bytes: int) -> None:
        self.cap_bytes = cap_bytes
        self.used = 0
        self.truncated = False
        self._at_line_start = True

    def take(self, text: str) -> str:
        """The part of `text` that goes into the log (plus the truncation line when the cap
        is reached by this piece)."""
        if self.truncated or not text:
            return ""
        size = utf8_len(text)
        # Output that leaves a line open keeps one byte free for the newline the notice
        # may need, so `used < cap` whenever a line is open.
        limit = self.cap_bytes if text.endswith("\n") else self.cap_bytes - 1
        if self.used + size <= limit:
            self.used += size
            self._at_line_start = text.endswith("\n")
            return text
        head = prefix_within(text, self.cap_bytes - self.used)
        if not (head.endswith("\n") or (not head and self._at_line_start)):
            head = prefix_within(text, self.cap_bytes - self.used - 1)
        self.used += utf8_len(head)
        self.truncated = True
        if head:
            self._at_line_start = head.endswith("\n")
        newline = "" if self._at_line_start else "\n"
        self.used += len(newline)
        return head + newline + truncation_line(self.cap_bytes)

"""Masking of sensitive variable values in a stream of text.

The text arrives in pieces; a secret may be split across two of them, so the masker holds
back a tail of at most len(longest secret) - 1 characters, and only from where a secret may
begin, until the next piece or the end.
The result is the same as masking the whole text in one go.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

MASK = "***"


class Masker:
    """Replace every occurrence of any secret with `***`, across piece boundaries."""

    def __init__(self, secrets: Iterable[str]) -> None:
        # Longest first, so that at one position the longest secret wins (a secret that
        # contains another is masked whole).
        values = sorted({s for s in secrets if s}, key=len, reverse=True)
        self._pattern = re.compile("|".join(re.escape(v) for v in values)) if values else None
        self._values = values
        self._hold = len(values[0]) - 1 if values else 0
        self._pending = ""

    @property
    def pending(self) -> str:
        """Raw text held back because it might be the start of a secret."""
        return self._pending

    def feed(self, text: str) -> str:
        """Take the next piece; return the masked text that is now safe to publish."""
        if self._pattern is None:
            return text
        buf = self._pending + text
        # A match starting before `safe` fits entirely in `buf`, so its decision is final;
        # anything from `safe` on could still grow into a secret with the next piece.
        safe = len(buf) - self._hold
        out: list[str] = []
        pos = 0
        for match in self._pattern.finditer(buf):
            if match.start() >= safe:
                break
            out.append(buf[pos : match.start()])
            out.append(MASK)
            pos = match.end()
        cut = max(pos, safe)
        # Of the tail, hold back only from where a secret could start: a log line that
        # cannot begin one is published now, not when the next output comes.
        keep = self._could_start(buf, cut)
        out.append(buf[pos:keep])
        self._pending = buf[keep:]
        return "".join(out)

    def _could_start(self, buf: str, start: int) -> int:
        """The first position from `start` where a secret begins or may begin (the rest of
        `buf` is a prefix of it); len(buf) if there is none."""
        for i in range(start, len(buf)):
            tail = buf[i:]
            if any(v.startswith(tail) or tail.startswith(v) for v in self._values):
                return i
        return len(buf)

    def finish(self) -> str:
        """The end of the stream (or a break in it): mask and return what is held back."""
        rest, self._pending = self._pending, ""
        if self._pattern is None or not rest:
            return rest
        return self._pattern.sub(MASK, rest)


def mask_all(text: str, secrets: Iterable[str]) -> str:
    """Mask a whole text at once (used for single lines the runner writes itself)."""
    masker = Masker(secrets)
    return masker.feed(text) + masker.finish()

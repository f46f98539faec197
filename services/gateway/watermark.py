"""The ingestion watermark: the highest stream sequence W such that every message up to W
has been processed (stored, or rejected and recorded) — not merely the highest seen.

Messages may arrive out of order (a redelivery after a crash), so sequences above W wait in
a set until the hole before them is filled.
"""

from __future__ import annotations

from collections.abc import Iterable


class Contiguity:
    def __init__(self, watermark: int = 0) -> None:
        self.watermark = watermark
        self._ahead: set[int] = set()

    def copy(self) -> Contiguity:
        other = Contiguity(self.watermark)
        other._ahead = set(self._ahead)
        return other

    def add(self, seqs: Iterable[int]) -> int:
        """Record processed sequences; return the new watermark."""
        for seq in seqs:
            if seq > self.watermark:
                self._ahead.add(seq)
        while self.watermark + 1 in self._ahead:
            self.watermark += 1
            self._ahead.discard(self.watermark)
        return self.watermark

    def skip_to(self, first_available: int) -> int:
        """The stream no longer holds anything before `first_available` (expired or
        purged): nothing there can ever arrive, so the watermark may pass over it."""
        if first_available - 1 > self.watermark:
            self.watermark = first_available - 1
            self._ahead = {s for s in self._ahead if s > self.watermark}
        return self.add(())

    @property
    def waiting(self) -> int:
        """How many processed sequences wait behind a hole."""
        return len(self._ahead)

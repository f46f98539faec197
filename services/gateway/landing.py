"""Batches stored at the same time land in any order; they are acknowledged in the order
they were read.

Ingestion acks a batch with one ack for its highest stream sequence, which JetStream takes
for everything up to it (ack policy all): that ack may go out only once every earlier batch
is stored too. Pure bookkeeping, unit-tested without servers.
"""

from __future__ import annotations

from collections import deque
from typing import Generic, TypeVar

T = TypeVar("T")


class InOrder(Generic[T]):
    def __init__(self) -> None:
        self._open: deque[T] = deque()
        self._landed: set[int] = set()

    def start(self, item: T) -> None:
        """An item began (after every item started before it)."""
        self._open.append(item)

    def land(self, item: T) -> list[T]:
        """`item` is done; return the items now done with every earlier one, in order."""
        self._landed.add(id(item))
        ready: list[T] = []
        while self._open and id(self._open[0]) in self._landed:
            first = self._open.popleft()
            self._landed.discard(id(first))
            ready.append(first)
        return ready

    def __len__(self) -> int:
        """Items started and not yet handed back by `land` (landed or not)."""
        return len(self._open)

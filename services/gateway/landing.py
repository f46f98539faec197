"""Batches stored at the same time land in any order; they are acknowledged in the order
they were read.

Ingestion acks a batch with one ack for its highest stream sequence, which JetStream takes
for everything up to it (ack policy all): that ack may go out only once every earlier batch
is stored too. Pure bookkeeping, unit-tested without servers.
"""

from __future__ import annotations

from typing import Generic, TypeVar

T = TypeVar("T")


class InOrder(Generic[T]):
    def __init__(self) -> None:
        # Started and not yet handed back, oldest first, by identity (an open item is
        # alive, so no other object has its id); the flag says whether it has landed.
        self._open: dict[int, tuple[T, bool]] = {}

    def start(self, item: T) -> None:
        """An item began (after every item started before it)."""
        self._open[id(item)] = (item, False)

    def land(self, item: T) -> list[T]:
        """`item` is done; return the items now done with every earlier one, in order. An
        item that is not open (handed back already) changes nothing."""
        key = id(item)
        if key not in self._open:
            return []
        self._open[key] = (item, True)  # a new value keeps the key's place
        ready: list[T] = []
        while self._open:
            first = next(iter(self._open))
            done, landed = self._open[first]
            if not landed:
                break
            del self._open[first]
            ready.append(done)
        return ready

    def __len__(self) -> int:
        """Items started and not yet handed back by `land` (landed or not)."""
        return len(self._open)

"""A stop request for the running job: cancel message, local timeout or drain deadline.
The first reason wins."""

from __future__ import annotations

import asyncio


class StopRequest:
    def __init__(self) -> None:
        self.reason: str | None = None
        self.why: str = ""
        self._event = asyncio.Event()

    def stop(self, reason: str, why: str) -> None:
        if self.reason is None:
            self.reason, self.why = reason, why
            self._event.set()

    @property
    def requested(self) -> bool:
        return self.reason is not None

    async def wait(self) -> None:
        await self._event.wait()

"""The client itself: HTTP calls with httpx, live logs and events over `/ws`."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from types import TracebackType
from typing import Any
from urllib.parse import urlencode

import httpx
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed

from services.common import codec
from services.common.status import is_final


class ApiError(Exception):
    """An error answer of the API: HTTP status, code, message and the fields it names."""

    def __init__(self, status: int, body: Any) -> None:
        error = body.get("error", {}) if isinstance(body, dict) else {}
        self.status = status
        self.code = str(error.get("code", "error"))
        self.message = str(error.get("message", body))
        self.fields: dict[str, str] = dict(error.get("fields") or {})
        detail = "; ".join(f"{k}: {v}" for k, v in self.fields.items())
        super().__init__(
            f"{status} {self.code}: {self.message}" + (f" ({detail})" if detail else "")
        )


class Gap(Exception):
    """The point to resume from is no longer retained: events were lost to retention."""

    def __init__(self, requested: int, first_available: int) -> None:
        super().__init__(f"events after {requested} are gone; the first kept is {first_available}")
        self.requested = requested
        self.first_available = first_available


class XoogifyClient:
    def __init__(self, base_url: str, token: str | None = None, timeout: float = 30.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.AsyncClient(base_url=self.base_url, headers=headers, timeout=timeout)

    async def __aenter__(self) -> XoogifyClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self._http.aclose()

    async def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        response = await self._http.request(method, path, **kwargs)
        try:
            body = response.json()
        except ValueError:
            body = {"error": {"code": "bad-response", "message": response.text[:200]}}
        if response.status_code >= 400:
            raise ApiError(response.status_code, body)
        return body

    # --- jobs ------------------------------------------------------------------------------
    async def submit(
        self,
        *,
        organization: str,
        environment: str,
        module_name: str,
        module_type: str,
        action: str,
        variables: dict[str, str] | None = None,
        sensitive: list[str] | None = None,
        timeout_s: int | None = None,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {
            "organization": organization,
            "environment": environment,
            "module_type": module_type,
            "module_name": module_name,
            "action": action,
        }
        if variables:
            body["variables"] = variables
        if sensitive:
            body["sensitive"] = sensitive
        if timeout_s is not None:
            body["timeout_s"] = timeout_s
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        job: dict[str, Any] = await self._call("POST", "/api/jobs", json=body, headers=headers)
        return job

    async def list_jobs(
        self, *, limit: int = 50, before: int | None = None, **filters: str | None
    ) -> dict[str, Any]:
        params: dict[str, Any] = {k: v for k, v in filters.items() if v}
        params["limit"] = limit
        if before is not None:
            params["before"] = before
        page: dict[str, Any] = await self._call("GET", "/api/jobs", params=params)
        return page

    async def get_job(self, build_id: int) -> dict[str, Any]:
        job: dict[str, Any] = await self._call("GET", f"/api/jobs/{build_id}")
        return job

    async def cancel(self, build_id: int) -> dict[str, Any]:
        job: dict[str, Any] = await self._call("POST", f"/api/jobs/{build_id}/cancel")
        return job

    async def read_logs(
        self, build_id: int, offset: int = 0, limit: int = 1024 * 1024
    ) -> dict[str, Any]:
        part: dict[str, Any] = await self._call(
            "GET", f"/api/jobs/{build_id}/logs", params={"offset": offset, "limit": limit}
        )
        return part

    async def runners(self) -> list[dict[str, Any]]:
        body = await self._call("GET", "/api/runners")
        items: list[dict[str, Any]] = body["items"]
        return items

    # --- live ------------------------------------------------------------------------------
    @property
    def ws_url(self) -> str:
        return self.base_url.replace("http://", "ws://", 1).replace("https://", "wss://", 1) + "/ws"

    def _ws(self, query: dict[str, Any] | None = None) -> Any:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else None
        url = self.ws_url
        if query:
            url += "?" + urlencode(query)
        return ws_connect(url, additional_headers=headers, max_size=16 * 1024 * 1024)

    async def follow_logs(self, build_id: int, offset: int = 0) -> AsyncIterator[str]:
        """Yield the job's log text from byte `offset` until its end, live while it runs.

        Reconnects from the last byte received if the socket drops, so nothing is lost
        or repeated. The final status is in `self.last_status` afterwards.
        """
        self.last_status: str | None = None
        while True:
            try:
                async with self._ws() as ws:
                    await ws.send(
                        codec.dumps_str(
                            {"type": "follow_logs", "build_id": build_id, "offset": offset}
                        )
                    )
                    async for raw in ws:
                        message = codec.loads(raw)
                        kind = message.get("type")
                        if message.get("build_id") != build_id:
                            continue
                        if kind == "log":
                            data: str = message["data"]
                            start = int(message["offset"])
                            # Trim anything we already have (a resent piece after a reconnect).
                            skip = offset - start
                            if skip > 0:
                                data = data.encode()[skip:].decode(errors="replace")
                                start = offset
                            if start == offset and data:
                                offset += len(data.encode())
                                yield data
                        elif kind == "log_end":
                            self.last_status = message.get("status")
                            return
            except (ConnectionClosed, OSError):
                await asyncio.sleep(0.5)
                # If the job ended while we were away, the stored log tells the rest.
                with contextlib.suppress(httpx.HTTPError, ApiError):
                    job = await self.get_job(build_id)
                    if is_final(job["status"]):
                        async for text in self._rest_of_log(build_id, offset):
                            offset += len(text.encode())
                            yield text
                        self.last_status = job["status"]
                        return

    async def _rest_of_log(self, build_id: int, offset: int) -> AsyncIterator[str]:
        while True:
            part = await self.read_logs(build_id, offset)
            if part["data"]:
                yield part["data"]
            if part["next_offset"] == offset or not part["data"]:
                return
            offset = part["next_offset"]

    async def watch(
        self, since: int = 0, allow_gap: bool = False, **filters: str | None
    ) -> AsyncIterator[dict[str, Any]]:
        """Every status event matching `filters` (organization, environment, status, …) after
        stream sequence `since`, then live: the job object plus its `stream_seq`.

        A dropped socket or a `resync` resumes after the last `stream_seq` seen, so nothing
        is lost or repeated; a point no longer retained raises Gap unless `allow_gap`."""
        last = since
        wanted = {k: v for k, v in filters.items() if v}
        while True:
            try:
                # The filter goes in the URL, so the socket is never pushed an update outside
                # it, nor a newer one before the replay of older ones.
                async with self._ws({**wanted, "since": last}) as ws:
                    message: dict[str, Any] = {"type": "filter", **wanted}
                    async for raw in ws:
                        frame = codec.loads(raw)
                        kind = frame.get("type")
                        if kind == "gap" and not allow_gap:
                            raise Gap(int(frame["requested"]), int(frame["first_available"]))
                        if kind == "resync":
                            message["since"] = last
                            await ws.send(codec.dumps_str(message))
                        for item in frame.get("items", []) if kind == "jobs" else []:
                            if int(item["stream_seq"]) > last:
                                last = int(item["stream_seq"])
                                yield item
            except (ConnectionClosed, OSError):
                await asyncio.sleep(0.5)

    async def wait_final(self, build_id: int, timeout: float = 3600.0) -> dict[str, Any]:
        """Wait for the job's final status over `/ws` (no polling); return the job."""
        async with asyncio.timeout(timeout):
            while True:
                try:
                    async with self._ws() as ws:
                        await ws.recv()  # hello
                        # Replay from what Postgres had stored before the job was read, not
                        # from hello's watermark: that is the hub's position, which runs
                        # ahead of Postgres, so an update between the two would be in
                        # neither the job read below nor the replay.
                        stored = (await self.list_jobs(limit=1))["watermark"]
                        try:
                            job = await self.get_job(build_id)
                        except ApiError as exc:
                            if exc.status != 404:  # 404: just submitted, not stored yet
                                raise
                        else:
                            if is_final(job["status"]):
                                return job
                        filt = {"type": "filter", "q": str(build_id)}
                        filt["since"] = stored
                        await ws.send(codec.dumps_str(filt))
                        async for raw in ws:
                            message = codec.loads(raw)
                            for item in message.get("items", []):
                                if item.get("build_id") == build_id and is_final(item["status"]):
                                    return dict(item)
                except (ConnectionClosed, OSError):
                    await asyncio.sleep(0.5)

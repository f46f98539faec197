"""The `/ws` endpoint (placeholder: the live part of the gateway replaces it)."""

from __future__ import annotations

from starlette.websockets import WebSocket


async def websocket_endpoint(websocket: WebSocket) -> None:
    await websocket.accept()
    await websocket.send_json({"type": "hello", "watermark": 0})
    await websocket.close()

"""JSON answers encoded by orjson (services.common.codec), not starlette's standard-library
`json`: a page of 500 jobs is the largest thing the API encodes, and orjson does it several
times faster with the same compact output."""

from __future__ import annotations

from typing import Any

from starlette.responses import JSONResponse

from services.common import codec


class FastJSONResponse(JSONResponse):
    def render(self, content: Any) -> bytes:
        return codec.dumps(content)

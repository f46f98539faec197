"""A message over MAX_MESSAGE_BYTES is refused before it is parsed, even one its schema
would accept."""

from __future__ import annotations

import orjson
import pytest

from services.common import schemas


def chunk(size: int) -> bytes:
    return orjson.dumps({"build_id": 1, "offset": 0, "data": "x" * size, "eof": False})


def test_a_chunk_under_the_limit_is_accepted() -> None:
    assert schemas.decode("log_chunk", chunk(32 * 1024))["offset"] == 0


def test_a_valid_chunk_over_the_limit_is_refused_naming_the_size() -> None:
    data = chunk(schemas.MAX_MESSAGE_BYTES)
    schemas.check("log_chunk", orjson.loads(data))  # the schema alone would take it
    with pytest.raises(schemas.SchemaError, match=f"{len(data)} bytes is over"):
        schemas.decode("log_chunk", data)

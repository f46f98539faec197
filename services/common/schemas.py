"""Load the JSON Schemas of `schemas/` and validate what a service receives at its boundary.

Errors name the field, so a 422 or a rejected-message record says what was wrong.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema_rs

from services.common import codec
from services.common.config import SCHEMAS_DIR

_BASE_URI = "https://xoogify.dev/schemas/"


@dataclass(frozen=True)
class Problem:
    field: str
    message: str


class SchemaError(ValueError):
    """A value that does not match its schema; `problems` name each bad field."""

    def __init__(self, schema: str, problems: list[Problem]) -> None:
        self.schema = schema
        self.problems = problems
        super().__init__(f"{schema}: " + "; ".join(f"{p.field}: {p.message}" for p in problems))

    def fields(self) -> dict[str, str]:
        return {p.field: p.message for p in self.problems}


@cache
def _registry(directory: Path) -> jsonschema_rs.Registry:
    resources = [
        (_BASE_URI + path.name, codec.loads(path.read_bytes()))
        for path in sorted(directory.glob("*.json"))
    ]
    return jsonschema_rs.Registry(resources)


@cache
def load(name: str, directory: Path = SCHEMAS_DIR) -> dict[str, Any]:
    doc: dict[str, Any] = codec.loads((directory / f"{name}.json").read_bytes())
    return doc


@cache
def validator(name: str, directory: Path = SCHEMAS_DIR) -> Any:
    return jsonschema_rs.validator_for(load(name, directory), registry=_registry(directory))


def _field_of(error: Any) -> str:
    path = [str(part) for part in error.instance_path]
    kind = error.kind
    if isinstance(kind, jsonschema_rs.ValidationErrorKind.Required):
        path.append(str(kind.property))
    elif isinstance(kind, jsonschema_rs.ValidationErrorKind.AdditionalProperties):
        path.extend(str(p) for p in kind.unexpected)
    return ".".join(path) or "(body)"


def problems(name: str, value: Any) -> list[Problem]:
    return [Problem(_field_of(err), err.message) for err in validator(name).iter_errors(value)]


def check(name: str, value: Any) -> Any:
    """Return `value` if it matches schema `name`, else raise SchemaError naming the fields."""
    v = validator(name)
    if v.is_valid(value):
        return value
    raise SchemaError(name, problems(name, value))


# No message the services write comes near this (the API caps a submission at 64 KiB, the
# runner a log chunk at 32 KiB); anything bigger is refused before it is parsed.
MAX_MESSAGE_BYTES = 256 * 1024


def decode(name: str, data: bytes, max_bytes: int = MAX_MESSAGE_BYTES) -> Any:
    """Parse JSON bytes and check them against schema `name` (SchemaError on either failure,
    or when the message is over `max_bytes`)."""
    if len(data) > max_bytes:
        problem = Problem("(body)", f"message of {len(data)} bytes is over {max_bytes} bytes")
        raise SchemaError(name, [problem])
    try:
        value = codec.loads(data)
    except ValueError as exc:
        raise SchemaError(name, [Problem("(body)", f"not valid JSON: {exc}")]) from None
    return check(name, value)

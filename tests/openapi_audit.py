"""Every HTTP answer the test suite gets from the gateway is checked against the OpenAPI
document (`schemas/openapi.json`): its status must be documented for that path and method
and its JSON body must match the documented schema. Wired in by tests/conftest.py around
httpx, so the API tests, the client and the CLI-in-process calls are all audited."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import httpx
import jsonschema_rs

from services.common import codec
from services.common.config import SCHEMAS_DIR


@cache
def document() -> dict[str, Any]:
    doc: dict[str, Any] = codec.loads((SCHEMAS_DIR / "openapi.json").read_bytes())
    return doc


@cache
def _templates() -> list[tuple[re.Pattern[str], str]]:
    out = []
    for template in document()["paths"]:
        pattern = re.sub(r"\\{[^}]+\\}", "[^/]+", re.escape(template))
        out.append((re.compile(f"^{pattern}$"), template))
    # Literal segments first: /versions must not be taken for a {module_name}.
    out.sort(key=lambda pair: pair[1].count("{"))
    return out


def _resolve(node: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        target: Any = document()
        for part in node["$ref"][2:].split("/"):
            target = target[part]
        node = target
    return node


@cache
def _validator(schema_json: str) -> Any:
    schema = {**codec.loads(schema_json), "components": document()["components"]}
    return jsonschema_rs.validator_for(schema)


def _check_body(schema: dict[str, Any], response: httpx.Response) -> list[str]:
    try:
        body = response.json()
    except ValueError:
        return ["body is not JSON"]
    validator = _validator(codec.dumps_str(schema))
    return [
        f"{'/'.join(map(str, e.instance_path))}: {e.message}" for e in validator.iter_errors(body)
    ]


def problems(request: httpx.Request, response: httpx.Response) -> list[str]:
    """What is wrong with this answer, as the document sees it (empty: nothing)."""
    path = request.url.path
    if not (path.startswith("/api/") or path in ("/healthz", "/readyz", "/metrics")):
        return []
    where = f"{request.method} {path} → {response.status_code}"
    template = next((t for rx, t in _templates() if rx.match(path)), None)
    item = document()["paths"].get(template) if template else None
    operation = item.get(request.method.lower()) if item else None
    extra = (item or {}).get("x-xoogify-extra-methods", {}).get(request.method)
    if extra is not None:
        # Terraform's LOCK/UNLOCK, which OpenAPI cannot name: statuses only (a 423 carries
        # Terraform's lock info, not our error shape).
        ok = str(response.status_code) in extra["responses"]
        return [] if ok else [f"{where}: status not documented"]
    documented = operation is not None and str(response.status_code) in operation["responses"]
    if operation is None or (response.status_code == 503 and not documented):
        # No such operation (404/405), or the gateway still starting: the error shape.
        if response.headers.get("content-type", "").startswith("application/json"):
            error = document()["components"]["schemas"]["Error"]
            return [f"{where}: {p}" for p in _check_body(error, response)]
        return []
    responses = operation["responses"]
    spec = responses.get(str(response.status_code)) or responses.get("default")
    if spec is None:
        return [f"{where}: status not documented"]
    content = _resolve(spec).get("content")
    if not content:
        return [] if not response.content else [f"{where}: undocumented body"]
    if "application/json" in content:
        schema = content["application/json"].get("schema", {})
        return [f"{where}: {p}" for p in _check_body(schema, response)]
    return []


@dataclass
class Audit:
    checked: int = 0
    found: list[str] = field(default_factory=list)

    def see(self, request: httpx.Request, response: httpx.Response) -> None:
        self.checked += 1
        self.found.extend(problems(request, response))

"""schemas/openapi.json without servers: an OpenAPI 3.1 document whose component schemas are
exact copies of the other files in schemas/, whose references all resolve, and which names
every route the gateway serves under /api/ and the health endpoints."""

from __future__ import annotations

import re
from typing import Any

import jsonschema_rs
import pytest

from services.common import codec
from services.common.config import SCHEMAS_DIR
from services.gateway import api, health, openapi, state_backend, webhooks

COPIES = {
    "job.json": "Job",
    "job_event.json": "JobEvent",
    "submission.json": "Submission",
    "webhook_create.json": "WebhookCreate",
    "webhook.json": "Webhook",
    "webhook_delivery.json": "WebhookDelivery",
}
# Path parameter names the routes use where the contract spells them otherwise.
_PARAM_NAMES = {"webhook_id": "id"}


def _doc() -> dict[str, Any]:
    value: dict[str, Any] = codec.loads(openapi.document())
    return value


def as_component(node: Any) -> Any:
    """A schema file as an OpenAPI component: no $schema/$id, references into components."""
    if isinstance(node, list):
        return [as_component(x) for x in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key in ("$schema", "$id"):
            continue
        if key == "$ref":
            if value.startswith(("defs.json#/$defs/", "#/$defs/")):
                value = "#/components/schemas/" + value.rsplit("/", 1)[-1]
            elif value in COPIES:
                value = "#/components/schemas/" + COPIES[value]
        out[key] = as_component(value)
    return out


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [r for v in node.values() for r in _refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []


def test_it_is_openapi_3_1() -> None:
    doc = _doc()
    assert doc["openapi"].startswith("3.1")
    assert doc["info"]["title"] and doc["paths"]


@pytest.mark.parametrize("filename", sorted(COPIES))
def test_component_schemas_are_copies_of_the_schema_files(filename: str) -> None:
    source = codec.loads((SCHEMAS_DIR / filename).read_bytes())
    assert _doc()["components"]["schemas"][COPIES[filename]] == as_component(source)


def test_shared_definitions_are_copied_too() -> None:
    defs = codec.loads((SCHEMAS_DIR / "defs.json").read_bytes())["$defs"]
    components = _doc()["components"]["schemas"]
    for name, schema in defs.items():
        assert components[name] == as_component(schema), name


def test_every_reference_resolves() -> None:
    doc = _doc()
    for ref in _refs(doc):
        assert ref.startswith("#/"), ref
        node: Any = doc
        for part in ref[2:].split("/"):
            node = node[part]
        assert isinstance(node, dict), ref


def test_every_component_schema_compiles() -> None:
    doc = _doc()
    for name in doc["components"]["schemas"]:
        wrapper = {"$ref": f"#/components/schemas/{name}", "components": doc["components"]}
        jsonschema_rs.validator_for(wrapper)


def _documented(path: str) -> str:
    path = re.sub(r"\{(\w+):\w+\}", r"{\1}", path)
    for ours, theirs in _PARAM_NAMES.items():
        path = path.replace("{" + ours + "}", "{" + theirs + "}")
    return path


def test_every_route_is_documented_with_its_methods() -> None:
    paths = _doc()["paths"]
    for route in [
        *api.routes,
        *webhooks.routes,
        *state_backend.routes,
        *health.routes,
        *openapi.routes,
    ]:
        item = paths[_documented(route.path)]
        extra = set(item.get("x-xoogify-extra-methods", {}))
        for method in route.methods or ():
            if method == "HEAD":
                continue
            assert method.lower() in item or method in extra, (route.path, method)


def test_every_error_answer_uses_the_error_shape() -> None:
    doc = _doc()
    for name, response in doc["components"]["responses"].items():
        schema = response["content"]["application/json"]["schema"]
        assert schema == {"$ref": "#/components/schemas/Error"}, name

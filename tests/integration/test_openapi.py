"""Real answers of the running gateway (with a scheduler, no runner), success and error
cases, validated against the OpenAPI document it serves at /api/openapi.json: each status
code must be documented for that path and method, and each JSON body must match the
documented schema."""

from __future__ import annotations

from typing import Any

import httpx
import jsonschema_rs

from services.common.config import Settings
from tests.stack import Stack
from tests.support import auth_headers, eventually

SUBMISSION = {
    "organization": "acme",
    "environment": "stg",
    "module_type": "amd64/script",
    "module_name": "hello",
    "action": "PLAN",
    "variables": {"who": "world"},
}


class Checker:
    def __init__(self, doc: dict[str, Any]) -> None:
        self.doc = doc
        self.checked: list[tuple[str, str, int]] = []

    def _resolve(self, node: dict[str, Any]) -> dict[str, Any]:
        while "$ref" in node:
            target: Any = self.doc
            for part in node["$ref"][2:].split("/"):
                target = target[part]
            node = target
        return node

    def check(self, method: str, template: str, response: httpx.Response) -> httpx.Response:
        operation = self.doc["paths"][template][method.lower()]
        status = str(response.status_code)
        assert status in operation["responses"], f"{method} {template}: {status} not documented"
        spec = self._resolve(operation["responses"][status])
        content = spec.get("content")
        if content is None:
            assert response.content == b"", f"{method} {template} {status}: undocumented body"
        elif "application/json" in content:
            assert response.headers["content-type"].startswith("application/json")
            schema = {**content["application/json"]["schema"], "components": self.doc["components"]}
            errors = [
                e.message for e in jsonschema_rs.validator_for(schema).iter_errors(response.json())
            ]
            assert errors == [], f"{method} {template} {status}: {errors}"
        else:
            media = next(iter(content))
            assert response.headers["content-type"].startswith(media)
        self.checked.append((method, template, response.status_code))
        return response


async def test_real_answers_match_the_openapi_document(settings: Settings, stack: Stack) -> None:
    await stack.start_gateway()
    await stack.start_scheduler()
    async with httpx.AsyncClient(
        base_url=stack.url, headers=auth_headers(stack.settings), timeout=10
    ) as http:
        served = await http.get("/api/openapi.json")
        assert served.status_code == 200
        c = Checker(served.json())
        c.check("GET", "/api/openapi.json", served)

        job = c.check("POST", "/api/jobs", await http.post("/api/jobs", json=SUBMISSION)).json()
        build_id = job["build_id"]
        assert job["status"] == "IN-PROGRESS"
        c.check("POST", "/api/jobs", await http.post("/api/jobs", json={"organization": "x"}))
        c.check("POST", "/api/jobs", await http.post("/api/jobs", content=b"{not json"))
        keyed = {"Idempotency-Key": "k1"}
        await http.post("/api/jobs", json=SUBMISSION, headers=keyed)
        other = {**SUBMISSION, "action": "DESTROY"}
        conflict = await http.post("/api/jobs", json=other, headers=keyed)
        assert c.check("POST", "/api/jobs", conflict).status_code == 409

        async def stored() -> httpx.Response | None:
            r = await http.get(f"/api/jobs/{build_id}")
            return r if r.status_code == 200 else None

        c.check("GET", "/api/jobs/{build_id}", await eventually(stored, timeout=20))
        c.check("GET", "/api/jobs/{build_id}", await http.get("/api/jobs/999999"))
        listed = c.check("GET", "/api/jobs", await http.get("/api/jobs?organization=acme"))
        assert build_id in [j["build_id"] for j in listed.json()["items"]]
        c.check("GET", "/api/jobs", await http.get("/api/jobs?limit=0"))
        c.check("GET", "/api/jobs", await http.get("/api/jobs?status=DONE"))
        logs = f"/api/jobs/{build_id}/logs"
        c.check("GET", "/api/jobs/{build_id}/logs", await http.get(logs))
        c.check("GET", "/api/jobs/{build_id}/logs", await http.get("/api/jobs/999999/logs"))
        c.check("GET", "/api/jobs/{build_id}/logs", await http.get(logs + "?offset=-1"))

        cancel = f"/api/jobs/{build_id}/cancel"

        async def cancelled() -> httpx.Response | None:
            # 503 (documented: "try again") while the scheduler is still loading its state.
            r = c.check("POST", "/api/jobs/{build_id}/cancel", await http.post(cancel))
            return r if r.status_code != 503 else None

        assert (await eventually(cancelled, timeout=20)).status_code == 202

        async def final() -> bool:
            return (await http.get(f"/api/jobs/{build_id}")).json()["status"] == "FAILURE"

        await eventually(final, timeout=20)
        again = c.check("POST", "/api/jobs/{build_id}/cancel", await http.post(cancel))
        assert again.status_code == 409
        c.check("GET", "/api/runners", await http.get("/api/runners"))

        hook_body = {
            "organization": "acme",
            "url": "http://127.0.0.1:9/h",
            "statuses": ["SUCCESS"],
            "secret": "0123456789",
        }
        hook = c.check("POST", "/api/webhooks", await http.post("/api/webhooks", json=hook_body))
        c.check("POST", "/api/webhooks", await http.post("/api/webhooks", json={"url": 1}))
        c.check("GET", "/api/webhooks", await http.get("/api/webhooks"))
        c.check("GET", "/api/webhooks", await http.get("/api/webhooks?organization=A.B"))
        deliveries = f"/api/webhooks/{hook.json()['id']}/deliveries"
        c.check("GET", "/api/webhooks/{id}/deliveries", await http.get(deliveries))
        c.check(
            "GET", "/api/webhooks/{id}/deliveries", await http.get("/api/webhooks/999/deliveries")
        )
        delete = f"/api/webhooks/{hook.json()['id']}"
        c.check("DELETE", "/api/webhooks/{id}", await http.delete(delete))
        c.check("DELETE", "/api/webhooks/{id}", await http.delete(delete))

        state = "/api/state/acme/stg/hello"
        template = "/api/state/{organization}/{environment}/{module_name}"
        assert c.check("GET", template, await http.get(state)).status_code == 401
        c.check("GET", template + "/versions", await http.get(state + "/versions"))

        c.check("GET", "/healthz", await http.get("/healthz"))
        c.check("GET", "/readyz", await http.get("/readyz"))
        c.check("GET", "/metrics", await http.get("/metrics"))

    statuses = {code for _, _, code in c.checked}
    assert {200, 201, 202, 204, 400, 401, 404, 409, 422} <= statuses

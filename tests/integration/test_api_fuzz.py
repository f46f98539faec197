"""A fuzz run of the HTTP API from its own OpenAPI document (issue #6): schemathesis
generates valid and invalid requests for every documented operation and sends them to a
real gateway (with a scheduler, no runner). Every answer must be no 5xx and must conform
to the document (status, content type, headers, body schema).

Schemathesis runs as its CLI in a subprocess: its pytest plugin and hypothesis's own
event loop do not mix with pytest-asyncio, and a subprocess keeps its warnings out of
`filterwarnings = error`. Terraform's LOCK/UNLOCK are not OpenAPI methods (the document
names them under `x-xoogify-extra-methods`), so the tool cannot send them; they are
covered by tests/integration/test_terraform_backend.py.

The fuzzer registers webhooks to URLs it makes up; the gateway under test sends every
delivery to a closed local proxy port instead, so nothing leaves this machine.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import httpx

from services.common import state_auth
from services.common.config import Settings
from services.common.embedded import free_port
from tests.stack import Stack
from tests.support import auth_headers, eventually

# Bounds the run to about a minute on the 2-core CI machine.
MAX_EXAMPLES = int(os.environ.get("XOOGIFY_FUZZ_EXAMPLES", "40"))
RUN_TIMEOUT_S = int(os.environ.get("XOOGIFY_FUZZ_TIMEOUT_S", "240"))
# Read from the run's working directory.
CONFIG = """
[generation]
# The credentials are set for the whole run; a "request without them" it generates would
# still carry them, and its acceptance be counted against the API.
with-security-parameters = false
# Unknown query parameters are ignored, as HTTP APIs do; the document does not forbid them.
allow-extra-parameters = false

[checks.negative_data_rejection]
# 413 (body too large) and 423 (state locked) refuse a request just as well.
expected-statuses = [400, 401, 403, 404, 405, 406, 409, 413, 415, 422, 423, 428, 429]
"""
CHECKS = ",".join(
    [
        "not_a_server_error",
        "status_code_conformance",
        "content_type_conformance",
        "response_headers_conformance",
        "response_schema_conformance",
        "negative_data_rejection",
    ]
)


def no_way_out() -> dict[str, str]:
    """Environment that sends the gateway's webhook deliveries to a closed local port: the
    fuzzer registers webhooks to whatever URLs it makes up, and this machine must not try
    to reach them (httpx sends every http(s) request through the proxy named here)."""
    closed = f"http://127.0.0.1:{free_port()}"
    names = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")
    # Both spellings: the lower-case one wins where both are set.
    env = {n: closed for name in names for n in (name, name.lower())}
    return env | {"NO_PROXY": "", "no_proxy": ""}


async def start(settings: Settings, stack: Stack) -> None:
    """Gateway and scheduler up, and the scheduler answering (until it has loaded its
    state a cancel is a documented 503, which the fuzzer would count as a 5xx)."""
    await stack.start_gateway(**no_way_out())
    await stack.start_scheduler()
    async with httpx.AsyncClient(
        base_url=stack.url, headers=auth_headers(settings), timeout=10
    ) as http:

        async def scheduler_answers() -> bool:
            return (await http.post("/api/jobs/999999/cancel")).status_code == 404

        await eventually(scheduler_answers, timeout=30)


async def schemathesis(
    url: str, tmp_path: Path, *args: str, config: str = "", schema: Path | None = None
) -> str:
    """Run the schemathesis CLI against the gateway at `url` (with the document it serves,
    or `schema`, a saved copy of it); its output, failing the test unless every check
    passed."""
    (tmp_path / "schemathesis.toml").write_text(CONFIG + config)
    location = [str(schema), "--url", url] if schema else [f"{url}/api/openapi.json"]
    command = [
        sys.executable,
        "-m",
        "schemathesis.cli",
        "run",
        *location,
        "--checks",
        CHECKS,
        "--max-examples",
        str(MAX_EXAMPLES),
        "--seed",
        os.environ.get("XOOGIFY_FUZZ_SEED", "6"),
        "--workers",
        "1",
        "--request-timeout",
        "10",
        *args,
    ]
    proc = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, cwd=tmp_path
    )
    try:
        async with asyncio.timeout(RUN_TIMEOUT_S):
            out, _ = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    text = out.decode(errors="replace")
    assert proc.returncode == 0, text
    return text


def header_args(settings: Settings) -> list[str]:
    return [
        arg for name, value in auth_headers(settings).items() for arg in ("-H", f"{name}: {value}")
    ]


async def test_fuzzed_requests_get_no_5xx_and_documented_answers(
    settings: Settings, stack: Stack, tmp_path: Path
) -> None:
    await start(settings, stack)
    out = await schemathesis(stack.url, tmp_path, *header_args(settings))
    # Every documented operation was tried.
    assert "17 selected / 17 total" in out and "Tested: 17" in out


async def test_fuzzed_state_backend_with_a_jobs_credentials(
    settings: Settings, stack: Stack, tmp_path: Path
) -> None:
    """The state backend answers only a running job's credentials for its workspace, so the
    first run sees 401s only: here the fuzzer gets an APPLY's credentials and the path of
    its workspace, and reaches reading, writing and deleting the state."""
    await start(settings, stack)
    async with httpx.AsyncClient(
        base_url=stack.url, headers=auth_headers(settings), timeout=10
    ) as http:
        job = (await http.post("/api/jobs", json=APPLY)).json()

        async def stored() -> bool:
            return (await http.get(f"/api/jobs/{job['build_id']}")).status_code == 200

        await eventually(stored, timeout=30)
        # The document itself needs an API token, which these runs must not send.
        schema = tmp_path / "openapi.json"
        schema.write_bytes((await http.get("/api/openapi.json")).content)
    creds = state_auth.issue(
        settings.state_secret, stack.url, job["build_id"], "acme", "stg", "network"
    )
    out = await schemathesis(
        stack.url,
        tmp_path,
        "--include-path-regex",
        "^/api/state/",
        "--auth",
        f"{creds.username}:{creds.password}",
        config=STATE_CONFIG,
        schema=schema,
    )
    assert "Tested: 4" in out
    async with httpx.AsyncClient(
        base_url=stack.url, headers=auth_headers(settings), timeout=10
    ) as http:
        versions = (await http.get("/api/state/acme/stg/network/versions")).json()["items"]
    # The fuzzer's valid states were stored (it got past the credentials).
    assert versions and all(v["build_id"] == job["build_id"] for v in versions)


APPLY = {
    "organization": "acme",
    "environment": "stg",
    "module_type": "amd64/terraform",
    "module_name": "network",
    "action": "APPLY-AUTO",
}
# The workspace the credentials are for; everything else is generated.
STATE_CONFIG = """
[[operations]]
include-path-regex = "^/api/state/"
[operations.parameters]
"path.organization" = "acme"
"path.environment" = "stg"
"path.module_name" = "network"
"""


async def test_webhooks_of_the_gateway_under_fuzz_reach_nothing(
    settings: Settings, stack: Stack
) -> None:
    """The guard itself: a webhook to a listening address gets no request, the delivery
    fails at the closed proxy port."""
    reached: list[bool] = []

    async def listener(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        reached.append(True)
        writer.close()

    server = await asyncio.start_server(listener, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        await start(settings, stack)
        async with httpx.AsyncClient(
            base_url=stack.url, headers=auth_headers(settings), timeout=10
        ) as http:
            hook = {
                "organization": "acme",
                "url": f"http://127.0.0.1:{port}/hook",
                "statuses": ["IN-PROGRESS"],
                "secret": "0123456789",
            }
            webhook = (await http.post("/api/webhooks", json=hook)).json()
            await http.post("/api/jobs", json=APPLY)

            async def attempted() -> bool:
                r = await http.get(f"/api/webhooks/{webhook['id']}/deliveries")
                return any(d["attempts"] >= 1 for d in r.json()["items"])

            await eventually(attempted, timeout=30)
    finally:
        server.close()
        await server.wait_closed()
    assert reached == []

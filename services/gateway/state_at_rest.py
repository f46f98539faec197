"""Terraform state encrypted at rest: what goes into `terraform_states.data` and back.

A row holds nonce + AES-256-GCM ciphertext and the id of the state key it is under, the
workspace as associated data (a blob copied into another workspace does not decrypt).
Rows from before encryption (`key_id` NULL) and rows under a retired key are re-encrypted
under the current key when the gateway starts.
"""

from __future__ import annotations

import logging
from typing import Any

import asyncpg

from services.common.crypto import SecretsError, StateCipher

log = logging.getLogger(__name__)

Workspace = tuple[str, str, str]


def _associated(ws: Workspace) -> bytes:
    return "/".join(("tfstate", *ws)).encode()


def seal(cipher: StateCipher, ws: Workspace, data: bytes) -> tuple[str, bytes]:
    """(key id, blob) to store."""
    return cipher.encrypt(data, _associated(ws))


def open_row(cipher: StateCipher, ws: Workspace, key_id: str | None, blob: bytes) -> bytes:
    if key_id is None:
        return blob  # stored before encryption; re-encrypted at the next start
    return cipher.decrypt(key_id, blob, _associated(ws))


async def reencrypt(pool: asyncpg.Pool[Any], cipher: StateCipher) -> int:
    """Bring every stored version under the current key, one row at a time (a state can be
    64 MiB); returns how many rows changed. Safe with two gateways at once: a row is only
    rewritten while it still has the key id it was read with."""
    stale = await pool.fetch(
        "SELECT organization, environment, module_name, version FROM terraform_states"
        " WHERE data IS NOT NULL AND key_id IS DISTINCT FROM $1",
        cipher.current,
    )
    changed = 0
    for ref in stale:
        where = (ref["organization"], ref["environment"], ref["module_name"], ref["version"])
        row = await pool.fetchrow(
            "SELECT key_id, data FROM terraform_states WHERE organization = $1"
            " AND environment = $2 AND module_name = $3 AND version = $4",
            *where,
        )
        if row is None or row["data"] is None or row["key_id"] == cipher.current:
            continue
        ws = where[:3]
        try:
            clear = open_row(cipher, ws, row["key_id"], bytes(row["data"]))
        except SecretsError as exc:
            # Its key is no longer configured: left as it is (a GET of it answers 500).
            log.error(
                "state version does not decrypt", extra={"row": str(where), "error": str(exc)}
            )
            continue
        key_id, blob = seal(cipher, ws, clear)
        status = await pool.execute(
            "UPDATE terraform_states SET data = $5, key_id = $6 WHERE organization = $1"
            " AND environment = $2 AND module_name = $3 AND version = $4"
            " AND key_id IS NOT DISTINCT FROM $7",
            *where,
            blob,
            key_id,
            row["key_id"],
        )
        changed += status == "UPDATE 1"
    return changed


async def reencrypt_in_background(pool: asyncpg.Pool[Any], cipher: StateCipher) -> None:
    """`reencrypt` as a side task of the gateway: its failure is logged, never fatal (the
    rows stay readable as they are)."""
    try:
        changed = await reencrypt(pool, cipher)
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        log.warning("state re-encryption stopped", extra={"error": repr(exc)})
        return
    if changed:
        log.info("state versions re-encrypted", extra={"rows": changed, "key_id": cipher.current})

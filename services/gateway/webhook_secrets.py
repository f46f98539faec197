"""Webhook signing secrets at rest: sealed under the gateway's state key (the one that
encrypts Terraform state), never stored in clear.

A delivery must be signed with the secret itself, so it cannot be hashed; encrypting it
means a dump of the database (or a backup) does not give away the means to forge
deliveries. The webhook's organization and URL are the associated data: a sealed secret
copied onto another webhook does not open. Rows from before encryption, or under a retired
key, are re-sealed when the gateway starts.
"""

from __future__ import annotations

import logging
from typing import Any

import asyncpg

from services.common.crypto import SecretsError, StateCipher

log = logging.getLogger(__name__)


def _associated(organization: str, url: str) -> bytes:
    return "\0".join(("webhook-secret", organization, url)).encode()


def seal(cipher: StateCipher, organization: str, url: str, secret: str) -> tuple[str, bytes]:
    """(key id, blob) to store for the webhook's secret."""
    return cipher.encrypt(secret.encode(), _associated(organization, url))


def open_secret(cipher: StateCipher, row: Any) -> str:
    """The secret of a `webhooks` row (organization, url, secret, secret_key_id,
    secret_sealed); raises SecretsError when it does not open."""
    if row["secret_key_id"] is None:
        return str(row["secret"])  # stored before encryption; re-sealed at the next start
    blob = bytes(row["secret_sealed"])
    associated = _associated(row["organization"], row["url"])
    return cipher.decrypt(row["secret_key_id"], blob, associated).decode()


async def reseal(pool: asyncpg.Pool[Any], cipher: StateCipher) -> int:
    """Bring every webhook's secret under the current key (clear ones included); returns
    how many rows changed. Safe with two gateways at once: a row is only rewritten while it
    still has the key id it was read with."""
    rows = await pool.fetch(
        "SELECT id, organization, url, secret, secret_key_id, secret_sealed FROM webhooks"
        " WHERE secret_key_id IS DISTINCT FROM $1",
        cipher.current,
    )
    changed = 0
    for row in rows:
        try:
            secret = open_secret(cipher, row)
        except SecretsError as exc:
            # Its key is no longer configured: its deliveries fail until it is recreated.
            log.error(
                "webhook secret does not open", extra={"webhook_id": row["id"], "error": str(exc)}
            )
            continue
        key_id, blob = seal(cipher, row["organization"], row["url"], secret)
        status = await pool.execute(
            "UPDATE webhooks SET secret = NULL, secret_key_id = $2, secret_sealed = $3"
            " WHERE id = $1 AND secret_key_id IS NOT DISTINCT FROM $4",
            row["id"],
            key_id,
            blob,
            row["secret_key_id"],
        )
        changed += status == "UPDATE 1"
    return changed

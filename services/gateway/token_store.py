"""API tokens in Postgres (table `api_tokens`, migration 004): create, list, revoke, and
look one up by its hash. Used by the gateway (every request) and by `xoogify token …`,
which talks to Postgres directly so tokens can be made before any gateway runs.

A token is `xo_` + 43 URL-safe characters (256 random bits); only its SHA-256 is stored.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg

from services.gateway import migrate

PREFIX = "xo_"
KINDS = ("admin", "org", "runner")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,62}$")
ORG = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")

_FIELDS = "id, name, kind, organizations, created_at, revoked_at, last_used_at"


@dataclass(frozen=True)
class TokenRecord:
    id: int
    name: str
    kind: str
    organizations: tuple[str, ...]
    created_at: datetime
    revoked_at: datetime | None
    last_used_at: datetime | None

    @classmethod
    def from_row(cls, row: Any) -> TokenRecord:
        return cls(
            id=row["id"],
            name=row["name"],
            kind=row["kind"],
            organizations=tuple(row["organizations"]),
            created_at=row["created_at"],
            revoked_at=row["revoked_at"],
            last_used_at=row["last_used_at"],
        )


def new_secret() -> str:
    return PREFIX + secrets.token_urlsafe(32)


def token_hash(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def check_new(name: str, kind: str, organizations: list[str]) -> None:
    """ValueError naming what is wrong with a token about to be created."""
    if not NAME.match(name):
        raise ValueError(
            "name: 1-63 characters of letters, digits, _ . @ - (it becomes requested_by)"
        )
    if kind not in KINDS:
        raise ValueError(f"kind: one of {', '.join(KINDS)}")
    if kind == "org":
        if not organizations:
            raise ValueError("an org token names at least one organization")
        bad = [o for o in organizations if not ORG.match(o)]
        if bad:
            raise ValueError(f"not an organization name: {', '.join(bad)}")
    elif organizations:
        raise ValueError(f"a {kind} token names no organizations")


async def create(
    conn: asyncpg.Connection | asyncpg.Pool, name: str, kind: str, organizations: list[str]
) -> tuple[TokenRecord, str]:
    """A new token: its record and the secret (shown once, never stored)."""
    check_new(name, kind, organizations)
    secret = new_secret()
    row = await conn.fetchrow(
        "INSERT INTO api_tokens (name, kind, organizations, token_hash) VALUES ($1, $2, $3, $4)"
        f" RETURNING {_FIELDS}",
        name,
        kind,
        sorted(set(organizations)),
        token_hash(secret),
    )
    return TokenRecord.from_row(row), secret


async def list_all(conn: asyncpg.Connection | asyncpg.Pool) -> list[TokenRecord]:
    rows = await conn.fetch(f"SELECT {_FIELDS} FROM api_tokens ORDER BY id")
    return [TokenRecord.from_row(r) for r in rows]


async def revoke(conn: asyncpg.Connection | asyncpg.Pool, token_id: int) -> bool:
    """Revoke a token; False when there is no such (unrevoked) token."""
    done = await conn.fetchval(
        "UPDATE api_tokens SET revoked_at = now() WHERE id = $1 AND revoked_at IS NULL"
        " RETURNING id",
        token_id,
    )
    return done is not None


async def find_active(conn: asyncpg.Connection | asyncpg.Pool, secret: str) -> TokenRecord | None:
    """The unrevoked token with this secret, marking it used; None when unknown or revoked."""
    row = await conn.fetchrow(
        "UPDATE api_tokens SET last_used_at = now()"
        " WHERE token_hash = $1 AND revoked_at IS NULL"
        f" RETURNING {_FIELDS}",
        token_hash(secret),
    )
    return None if row is None else TokenRecord.from_row(row)


async def ensure_admin_token_file(database_url: str, path: Path, name: str = "admin") -> str:
    """The admin token kept in `path` (what `xoogify up` prints as its login URL): reused
    while the database still accepts it, else a new one is made and written (mode 0600)."""
    conn = await asyncpg.connect(database_url)
    try:
        await migrate.apply(conn)
        if path.exists():
            secret = path.read_text().strip()
            if secret and await find_active(conn, secret) is not None:
                return secret
        _, secret = await create(conn, name, "admin", [])
    finally:
        await conn.close()
    path.write_text(secret + "\n")
    path.chmod(0o600)
    return secret

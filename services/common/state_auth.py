"""Per-job credentials for the Terraform HTTP state backend.

The scheduler hands a runner, with each terraform job, HTTP Basic credentials that are good
for that job's workspace only; the gateway checks them by recomputing the same HMAC with the
secret both share (`XOOGIFY_STATE_SECRET`), so no credential is ever stored.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

_USER_PREFIX = "build-"


@dataclass(frozen=True)
class StateCredentials:
    address: str
    username: str
    password: str

    def as_dict(self) -> dict[str, str]:
        return {"address": self.address, "username": self.username, "password": self.password}


def state_path(organization: str, environment: str, module_name: str) -> str:
    return f"/api/state/{organization}/{environment}/{module_name}"


def _password(secret: str, build_id: int, workspace: str) -> str:
    message = f"{build_id}:{workspace}".encode()
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def issue(
    secret: str,
    gateway_url: str,
    build_id: int,
    organization: str,
    environment: str,
    module_name: str,
) -> StateCredentials:
    path = state_path(organization, environment, module_name)
    return StateCredentials(
        address=gateway_url.rstrip("/") + path,
        username=f"{_USER_PREFIX}{build_id}",
        password=_password(secret, build_id, path),
    )


def verify(secret: str, username: str, password: str, path: str) -> int | None:
    """The build ID these credentials were issued to for `path`, or None if they were not."""
    if not secret or not username.startswith(_USER_PREFIX):
        return None
    try:
        build_id = int(username[len(_USER_PREFIX) :])
    except ValueError:
        return None
    expected = _password(secret, build_id, path)
    return build_id if hmac.compare_digest(expected, password) else None

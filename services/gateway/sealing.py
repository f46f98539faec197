"""Sensitive values of a submission: sealed for the runners the moment they arrive, bound to
the build they belong to, and published without any clear copy.

The build ID is the submission's stream sequence, known only once it is stored; so a
submission with sensitive values is sealed for "last sequence + 1" and published with
`Nats-Expected-Last-Sequence`: if another submission took that sequence first, the stream
refuses it and it is sealed again for the next one.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from nats.js import JetStreamContext
from nats.js.errors import APIError

from services.common import codec, crypto
from services.common.config import Settings
from services.common.jspub import Ack, JsPublisher
from services.gateway.errors import ApiError

MASK = "***"
# JetStream's "wrong last sequence" error code.
_WRONG_LAST_SEQUENCE = 10071
# Tries before a sensitive submission gives up under a storm of concurrent submissions.
_ATTEMPTS = 50


@dataclass(frozen=True)
class GatewayKeys:
    """The gateway's keys: it can seal sensitive values and read and write state at rest,
    never open a sealed value."""

    sealer: crypto.Sealer
    state: crypto.StateCipher

    @classmethod
    def from_settings(cls, settings: Settings) -> GatewayKeys:
        """Raises SecretsError naming the missing or malformed setting."""
        return cls(
            crypto.Sealer(settings.secrets_public_key), crypto.StateCipher(settings.state_key)
        )


def split(
    variables: Mapping[str, str], sensitive: list[str]
) -> tuple[dict[str, str], dict[str, str]]:
    """(variables with sensitive values masked, the sensitive values)."""
    hidden = {name: variables[name] for name in sensitive if name in variables}
    shown = {name: MASK if name in hidden else value for name, value in variables.items()}
    return shown, hidden


async def publish_submission(
    js: JetStreamContext,
    pub: JsPublisher,
    settings: Settings,
    keys: GatewayKeys,
    message: dict[str, Any],
    hidden: Mapping[str, str],
    headers: dict[str, str] | None,
) -> Ack:
    """Publish `message` on the submit subject; with sensitive values, their sealed form
    rides along as `secrets`, bound to the build ID the message is stored under."""
    subjects = settings.subjects
    if not hidden:
        return await pub.publish(subjects.submit, codec.dumps(message), headers=headers)
    for _ in range(_ATTEMPTS):
        last = (await js.stream_info(subjects.submit_stream)).state.last_seq
        sealed = keys.sealer.seal(hidden, crypto.Binding.of(last + 1, message))
        expect = {**(headers or {}), "Nats-Expected-Last-Sequence": str(last)}
        try:
            return await pub.publish(
                subjects.submit, codec.dumps({**message, "secrets": sealed}), headers=expect
            )
        except APIError as exc:
            if exc.err_code != _WRONG_LAST_SEQUENCE:
                raise
    raise ApiError(503, "too many concurrent submissions; try again", "busy")

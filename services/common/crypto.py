"""Sensitive values between the gateway and a runner, and Terraform state at rest.

Sealing is HPKE (RFC 9180: X25519, HKDF-SHA256, ChaCha20-Poly1305) to the runners' public
key. The gateway holds only that public key, so nothing it stores or publishes can be opened
by it; the job's identity (build_id and workspace) is the HPKE `info`, so a ciphertext opens
only for the build it was sealed for. State blobs are AES-256-GCM under the gateway's state
key, the workspace as associated data. Keys are base64 (32 raw bytes); a key's id is a hash
of it, so rotation is "put the new key first, keep the old ones after it, comma-separated".
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
from collections.abc import Mapping
from dataclasses import dataclass

import orjson
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hpke, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

SEALED_PREFIX = "hpke1"
_SUITE = hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.CHACHA20_POLY1305)
_INFO_LABEL = b"xoogify-secrets-v1\x00"
_STATE_NONCE = 12
_RAW = serialization.Encoding.Raw


class SecretsError(Exception):
    """A key is missing or malformed, or a ciphertext does not open (wrong key, wrong
    build, tampered)."""


# --- keys --------------------------------------------------------------------------------
def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _raw_key(text: str, what: str) -> bytes:
    if not text.strip():
        raise SecretsError(f"{what} is not set")
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise SecretsError(f"{what} is not base64") from None  # the value itself is not shown
    if len(raw) != 32:
        raise SecretsError(f"{what} must be 32 bytes (base64), not {len(raw)}")
    return raw


def key_id(raw: bytes) -> str:
    """A short public name for a key (of a public key for the sealing pair)."""
    return hashlib.sha256(raw).hexdigest()[:12]


def _key_list(text: str, what: str) -> list[bytes]:
    keys = [_raw_key(part, what) for part in text.split(",") if part.strip()]
    if not keys:
        raise SecretsError(f"{what} is not set")
    return keys


def generate_sealing_pair() -> tuple[str, str]:
    """(private, public), base64: the runners' key pair."""
    private = X25519PrivateKey.generate()
    return (
        _b64(
            private.private_bytes(
                _RAW, serialization.PrivateFormat.Raw, serialization.NoEncryption()
            )
        ),
        _b64(private.public_key().public_bytes(_RAW, serialization.PublicFormat.Raw)),
    )


def generate_state_key() -> str:
    return _b64(AESGCM.generate_key(bit_length=256))


# --- sealing sensitive values ------------------------------------------------------------
@dataclass(frozen=True)
class Binding:
    """What a ciphertext is for: it opens only with exactly these values."""

    build_id: int
    organization: str
    environment: str
    module_name: str
    module_type: str
    action: str

    def info(self) -> bytes:
        return _INFO_LABEL + orjson.dumps(
            [
                self.build_id,
                self.organization,
                self.environment,
                self.module_name,
                self.module_type,
                self.action,
            ]
        )

    @classmethod
    def of(cls, build_id: int, job: Mapping[str, object]) -> Binding:
        """From anything with the job's identity fields (a submission, a dispatch)."""
        return cls(
            build_id=int(build_id),
            organization=str(job["organization"]),
            environment=str(job["environment"]),
            module_name=str(job["module_name"]),
            module_type=str(job["module_type"]),
            action=str(job["action"]),
        )


class Sealer:
    """The gateway's half: seals with the public key, cannot open."""

    def __init__(self, public_key: str) -> None:
        raw = _raw_key(public_key, "XOOGIFY_SECRETS_PUBLIC_KEY")
        self._key = X25519PublicKey.from_public_bytes(raw)
        self.key_id = key_id(raw)

    def seal(self, values: Mapping[str, str], binding: Binding) -> str:
        """`hpke1.<key id>.<base64 ciphertext>` of the name → value map."""
        sealed = _SUITE.encrypt(orjson.dumps(dict(values)), self._key, info=binding.info())
        return f"{SEALED_PREFIX}.{self.key_id}.{_b64(sealed)}"


class Opener:
    """The runner's half: one or more private keys (the first is current; older ones open
    what was sealed before a rotation)."""

    def __init__(self, private_keys: str) -> None:
        self._keys: dict[str, X25519PrivateKey] = {}
        for raw in _key_list(private_keys, "XOOGIFY_SECRETS_PRIVATE_KEY"):
            private = X25519PrivateKey.from_private_bytes(raw)
            public = private.public_key().public_bytes(_RAW, serialization.PublicFormat.Raw)
            self._keys[key_id(public)] = private

    def open(self, sealed: str, binding: Binding) -> dict[str, str]:
        prefix, _, rest = sealed.partition(".")
        kid, _, body = rest.partition(".")
        if prefix != SEALED_PREFIX or not body:
            raise SecretsError("not a sealed value")
        private = self._keys.get(kid)
        if private is None:
            raise SecretsError(f"sealed for key {kid}, which this runner does not hold")
        try:
            clear = _SUITE.decrypt(
                base64.b64decode(body, validate=True), private, info=binding.info()
            )
        except (InvalidTag, binascii.Error, ValueError):
            raise SecretsError(
                f"the sensitive values do not open for build {binding.build_id}"
                " (sealed for another job, or altered)"
            ) from None
        values = orjson.loads(clear)
        if not isinstance(values, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in values.items()
        ):
            raise SecretsError("the sealed value is not a map of strings")
        return values


# --- Terraform state at rest -------------------------------------------------------------
class StateCipher:
    """AES-256-GCM under the gateway's state keys: encrypts with the first, decrypts with
    whichever key id a row names."""

    def __init__(self, state_keys: str) -> None:
        keys = _key_list(state_keys, "XOOGIFY_STATE_KEY")
        self._keys = {key_id(raw): AESGCM(raw) for raw in keys}
        self.current = key_id(keys[0])
        # Keyed hashing (Idempotency-Key body comparison) with a key derived from this one,
        # so a hash of a body holding a weak secret cannot be brute-forced offline.
        self._hash_key = hmac.digest(keys[0], b"xoogify-body-hash", "sha256")

    def encrypt(self, data: bytes, associated: bytes) -> tuple[str, bytes]:
        nonce = os.urandom(_STATE_NONCE)
        return self.current, nonce + self._keys[self.current].encrypt(nonce, data, associated)

    def decrypt(self, kid: str, blob: bytes, associated: bytes) -> bytes:
        aes = self._keys.get(kid)
        if aes is None:
            raise SecretsError(f"state encrypted with key {kid}, which is not configured")
        try:
            return aes.decrypt(blob[:_STATE_NONCE], blob[_STATE_NONCE:], associated)
        except InvalidTag:
            raise SecretsError(
                "state blob does not decrypt (altered, or another workspace)"
            ) from None

    def keyed_hash(self, data: bytes) -> str:
        return hmac.new(self._hash_key, data, "sha256").hexdigest()

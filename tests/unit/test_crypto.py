"""Sealing of sensitive values and encryption of state at rest (services.common.crypto)."""

from __future__ import annotations

import base64
from dataclasses import replace

import pytest

from services.common import crypto
from services.common.crypto import Binding, Opener, Sealer, SecretsError, StateCipher

BINDING = Binding(42, "acme", "stg", "vpc", "amd64/terraform", "APPLY-AUTO")
VALUES = {"db_password": "hunter2-ü", "token": "t0k"}


@pytest.fixture
def pair() -> tuple[str, str]:
    return crypto.generate_sealing_pair()


def test_round_trip(pair: tuple[str, str]) -> None:
    private, public = pair
    sealed = Sealer(public).seal(VALUES, BINDING)
    assert sealed.startswith("hpke1.")
    assert "hunter2" not in sealed and "t0k" not in base64.b64decode(sealed.split(".")[2]).decode(
        "latin-1"
    )
    assert Opener(private).open(sealed, BINDING) == VALUES


def test_sealing_is_randomised(pair: tuple[str, str]) -> None:
    _, public = pair
    assert Sealer(public).seal(VALUES, BINDING) != Sealer(public).seal(VALUES, BINDING)


@pytest.mark.parametrize(
    "other",
    [
        replace(BINDING, build_id=43),
        replace(BINDING, organization="globex"),
        replace(BINDING, environment="prod"),
        replace(BINDING, module_name="db"),
        replace(BINDING, module_type="arm64/terraform"),
        replace(BINDING, action="PLAN"),
    ],
)
def test_another_job_cannot_open_it(pair: tuple[str, str], other: Binding) -> None:
    private, public = pair
    sealed = Sealer(public).seal(VALUES, BINDING)
    with pytest.raises(SecretsError, match="do not open for build"):
        Opener(private).open(sealed, other)


def test_tampered_ciphertext_fails(pair: tuple[str, str]) -> None:
    private, public = pair
    prefix, kid, body = Sealer(public).seal(VALUES, BINDING).split(".")
    raw = bytearray(base64.b64decode(body))
    raw[-5] ^= 0x01
    tampered = ".".join((prefix, kid, base64.b64encode(bytes(raw)).decode()))
    with pytest.raises(SecretsError):
        Opener(private).open(tampered, BINDING)
    with pytest.raises(SecretsError, match="not a sealed value"):
        Opener(private).open("***", BINDING)


def test_another_key_pair_cannot_open_it(pair: tuple[str, str]) -> None:
    _, public = pair
    other_private, _ = crypto.generate_sealing_pair()
    sealed = Sealer(public).seal(VALUES, BINDING)
    with pytest.raises(SecretsError, match="does not hold"):
        Opener(other_private).open(sealed, BINDING)


def test_runner_keeps_old_private_keys_after_rotation(pair: tuple[str, str]) -> None:
    old_private, old_public = pair
    new_private, new_public = crypto.generate_sealing_pair()
    before = Sealer(old_public).seal(VALUES, BINDING)
    after = Sealer(new_public).seal(VALUES, BINDING)
    opener = Opener(f"{new_private},{old_private}")
    assert opener.open(before, BINDING) == VALUES
    assert opener.open(after, BINDING) == VALUES


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("", "XOOGIFY_SECRETS_PUBLIC_KEY is not set"),
        ("not base64!", "not base64"),
        (base64.b64encode(b"short").decode(), "must be 32 bytes"),
    ],
)
def test_bad_public_key_is_named(value: str, message: str) -> None:
    with pytest.raises(SecretsError, match=message):
        Sealer(value)


def test_missing_keys_are_named() -> None:
    with pytest.raises(SecretsError, match="XOOGIFY_SECRETS_PRIVATE_KEY is not set"):
        Opener("")
    with pytest.raises(SecretsError, match="XOOGIFY_STATE_KEY is not set"):
        StateCipher("")


def test_state_round_trip_and_binding() -> None:
    cipher = StateCipher(crypto.generate_state_key())
    state = b'{"version": 4, "resources": [{"password": "s3cr3t"}]}'
    kid, blob = cipher.encrypt(state, b"tfstate/acme/stg/vpc")
    assert kid == cipher.current
    assert b"s3cr3t" not in blob and b"resources" not in blob
    assert cipher.decrypt(kid, blob, b"tfstate/acme/stg/vpc") == state
    with pytest.raises(SecretsError, match="another workspace"):
        cipher.decrypt(kid, blob, b"tfstate/acme/prod/vpc")
    tampered = blob[:-1] + bytes([blob[-1] ^ 1])
    with pytest.raises(SecretsError):
        cipher.decrypt(kid, tampered, b"tfstate/acme/stg/vpc")


def test_state_key_rotation() -> None:
    old, new = crypto.generate_state_key(), crypto.generate_state_key()
    kid, blob = StateCipher(old).encrypt(b"{}", b"ws")
    rotated = StateCipher(f"{new},{old}")
    assert rotated.current != kid
    assert rotated.decrypt(kid, blob, b"ws") == b"{}"
    assert rotated.encrypt(b"{}", b"ws")[0] == rotated.current
    with pytest.raises(SecretsError, match="not configured"):
        StateCipher(new).decrypt(kid, blob, b"ws")


def test_keyed_hash_depends_on_the_key() -> None:
    a, b = StateCipher(crypto.generate_state_key()), StateCipher(crypto.generate_state_key())
    assert a.keyed_hash(b"body") == a.keyed_hash(b"body")
    assert a.keyed_hash(b"body") != b.keyed_hash(b"body")

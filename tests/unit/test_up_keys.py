"""`xoogify up` hands each role only its keys, generated once into the data dir."""

from __future__ import annotations

import stat
from pathlib import Path

from services.cli.up import PRIVATE_KEY, PUBLIC_KEY, STATE_KEY, _role_keys
from services.common import crypto


def test_keys_are_generated_once_mode_0600_and_split_by_role(tmp_path: Path) -> None:
    env = {"PATH": "/bin"}
    keys = _role_keys(tmp_path, env)
    assert set(keys["gateway"]) == {PUBLIC_KEY, STATE_KEY}
    assert set(keys["runner"]) == {PRIVATE_KEY}
    assert keys["scheduler"] == {}
    for name in ("secrets-private.key", "secrets-public.key", "state.key"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600
    # The pair matches: what the gateway seals, the runner opens.
    binding = crypto.Binding(1, "acme", "stg", "m", "amd64/script", "PLAN")
    sealed = crypto.Sealer(keys["gateway"][PUBLIC_KEY]).seal({"a": "b"}, binding)
    assert crypto.Opener(keys["runner"][PRIVATE_KEY]).open(sealed, binding) == {"a": "b"}
    # A restart keeps them (sealed values in flight and stored state stay readable).
    assert _role_keys(tmp_path, {"PATH": "/bin"}) == keys


def test_keys_from_the_environment_win_and_leave_the_shared_env(tmp_path: Path) -> None:
    private, public = crypto.generate_sealing_pair()
    state = crypto.generate_state_key()
    env = {PRIVATE_KEY: private, PUBLIC_KEY: public, STATE_KEY: state, "PATH": "/bin"}
    keys = _role_keys(tmp_path, env)
    assert env == {"PATH": "/bin"}  # no child inherits a key through the shared env
    assert keys["gateway"] == {PUBLIC_KEY: public, STATE_KEY: state}
    assert keys["runner"] == {PRIVATE_KEY: private}
    assert list(tmp_path.iterdir()) == []

"""Per-node nats-server configs (services/common/nats_cluster.py), without a server."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from services.common import nats_auth, nats_cluster
from services.common.embedded import find_nats_server
from services.common.subjects import Subjects

PASSWORDS = {user: f"pw-{user}" for user in nats_auth.users_for(["acme"])}


def configs(names: list[str], route_password: str = "r/p@ss") -> dict[str, str]:
    return nats_cluster.cluster_configs(
        Subjects(),
        PASSWORDS,
        [nats_cluster.Node(name) for name in names],
        cluster_name="xoogify",
        route_password=route_password,
        store_dir=Path("/data/jetstream"),
    )


def test_password_variables_per_user() -> None:
    assert nats_cluster.password_variable("gateway") == "XOOGIFY_NATS_PASSWORD_GATEWAY"
    assert nats_cluster.password_variable("sub-acme") == "XOOGIFY_NATS_PASSWORD_SUB_ACME"
    env = {"XOOGIFY_NATS_PASSWORD_GATEWAY": "g", "XOOGIFY_NATS_PASSWORD_RUNNER": ""}
    with pytest.raises(nats_cluster.MissingPasswords) as missing:
        nats_cluster.passwords_from_env(["gateway", "runner", "sub-acme"], env)
    assert "XOOGIFY_NATS_PASSWORD_RUNNER" in str(missing.value)
    assert "XOOGIFY_NATS_PASSWORD_SUB_ACME" in str(missing.value)
    assert "GATEWAY" not in str(missing.value)
    # Two organizations whose variables would collide are refused, not merged.
    with pytest.raises(ValueError, match="same password variable"):
        nats_cluster.passwords_from_env(["sub-a-b", "sub-a_b"], {})


def test_every_node_routes_to_every_other_with_the_route_password(tmp_path: Path) -> None:
    written = configs(["nats-1", "nats-2", "nats-3"])
    assert set(written) == {"nats-1", "nats-2", "nats-3"}
    for name, text in written.items():
        assert f'server_name: "{name}"' in text
        others = {"nats-1", "nats-2", "nats-3"} - {name}
        for other in others:
            # The password is quoted in the URL (it holds '/' and '@').
            assert f'"nats://route:r%2Fp%40ss@{other}:6222"' in text
        assert f"@{name}:6222" not in text
        assert '"password": "r/p@ss"' in text  # what the route listener checks
        path = tmp_path / f"{name}.conf"
        path.write_text(text)
        checked = subprocess.run(
            [find_nats_server(), "-t", "-c", str(path)], capture_output=True, text=True
        )
        assert checked.returncode == 0, checked.stderr


def test_a_single_node_has_no_cluster_and_needs_no_route_password() -> None:
    (text,) = configs(["nats"], route_password="").values()
    assert "cluster:" not in text and '"user": "gateway"' in text
    with pytest.raises(nats_cluster.MissingPasswords, match="ROUTE_PASSWORD"):
        configs(["a", "b"], route_password="")
    with pytest.raises(ValueError, match="distinct"):
        configs(["a", "a"])


def test_the_users_are_nats_auths() -> None:
    (text,) = configs(["nats"]).values()
    assert text.endswith(nats_auth.server_config(Subjects(), PASSWORDS, Path("/data/jetstream")))

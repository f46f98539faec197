"""compose.yaml, the Dockerfile and deploy/Caddyfile, checked without Docker.

Real validators first: the Rust `compose_spec` parser (the Compose specification, after
Compose's own `${VAR}` interpolation), BuildKit's Dockerfile parser and hadolint, Caddy's
Caddyfile adapter, nats-server's config test of what `xoogify nats-config` writes. Then
what no schema knows: dependencies that can be waited for, each service's settings as the
services read them, runner platforms, secrets only from the uncommitted .env, volumes.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import dockerfile
import pytest
import yaml
from compose_spec import PyCompose

from services.cli.main import build_parser
from services.cli.main import main as xoogify_main
from services.common import nats_auth, nats_cluster
from services.common.config import REPO_ROOT, Settings
from services.common.embedded import find_nats_server

COMPOSE = REPO_ROOT / "compose.yaml"
DOCKERFILE = REPO_ROOT / "Dockerfile"
CADDYFILE = REPO_ROOT / "deploy" / "Caddyfile"
ENV_EXAMPLE = REPO_ROOT / ".env.example"

ARCHES = ("amd64", "arm64")
# Names of settings that hold a secret: their values must come from .env.
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|PRIVATE|_KEY$")


# --- Compose's interpolation (compose-spec "Interpolation") ---------------------------------

_INTERPOLATION = re.compile(
    r"\$(?:(?P<escaped>\$)"
    r"|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}"
    r"|(?P<named>[A-Za-z_][A-Za-z0-9_]*)"
    r"|(?P<invalid>))"
)


class InterpolationError(ValueError):
    pass


def interpolate_text(text: str, env: Mapping[str, str]) -> str:
    def replace(match: re.Match[str]) -> str:
        if match["escaped"]:
            return "$"
        if match["invalid"] is not None:
            raise InterpolationError(f"invalid interpolation in {text!r}")
        name = match["braced"] or match["named"]
        op, arg = match["op"], match["arg"] or ""
        value = env.get(name)
        is_set = value is not None
        usable = is_set and (value != "" or not (op or "").startswith(":"))
        if op in ("-", ":-"):
            return value if usable and value is not None else arg
        if op in ("?", ":?"):
            if not usable or value is None:
                raise InterpolationError(f"{name}: {arg}")
            return value
        if op in ("+", ":+"):
            return arg if usable else ""
        return value or ""

    return _INTERPOLATION.sub(replace, text)


def interpolate(node: Any, env: Mapping[str, str]) -> Any:
    if isinstance(node, str):
        return interpolate_text(node, env)
    if isinstance(node, list):
        return [interpolate(item, env) for item in node]
    if isinstance(node, dict):
        return {key: interpolate(value, env) for key, value in node.items()}
    return node


def variables_in(node: Any) -> Iterator[tuple[str, str]]:
    """(variable, operator) of every reference in the raw file."""
    if isinstance(node, str):
        for match in _INTERPOLATION.finditer(node):
            name = match["braced"] or match["named"]
            if name:
                yield name, match["op"] or ""
    elif isinstance(node, list):
        for item in node:
            yield from variables_in(item)
    elif isinstance(node, dict):
        for value in node.values():
            yield from variables_in(value)


# --- loading --------------------------------------------------------------------------------


def env_example() -> dict[str, str]:
    """Every variable .env.example names (commented-out ones included), as written."""
    names: dict[str, str] = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        match = re.fullmatch(r"#?\s*([A-Z][A-Z0-9_]*)=(.*)", line.strip())
        if match:
            names[match[1]] = match[2]
    return names


def filled_env() -> dict[str, str]:
    """.env.example as an operator fills it in: every empty required value gets one."""
    env = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        match = re.fullmatch(r"([A-Z][A-Z0-9_]*)=(.*)", line.strip())
        if match:
            env[match[1]] = match[2] or "t-" + match[1].lower().replace("_", "-")
    env["XOOGIFY_SUBSCRIBER_ORGS"] = "acme,globex"
    env["XOOGIFY_NATS_PASSWORD_SUB_ACME"] = "acmepw"
    env["XOOGIFY_NATS_PASSWORD_SUB_GLOBEX"] = "globexpw"
    return env


def raw_compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def env() -> dict[str, str]:
    return filled_env()


@pytest.fixture(scope="module")
def compose(env: dict[str, str]) -> dict[str, Any]:
    return interpolate(raw_compose(), env)


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


def validate_compose(data: dict[str, Any]) -> None:
    PyCompose.from_json(json.dumps(data)).validate()


def environment(service: Mapping[str, Any]) -> dict[str, str]:
    value = service.get("environment") or {}
    if isinstance(value, list):
        return dict(item.split("=", 1) for item in value)
    return {k: "" if v is None else str(v) for k, v in value.items()}


def xoogify_command(service: Mapping[str, Any]) -> list[str] | None:
    """The `xoogify` arguments of a service built from the Dockerfile, else None."""
    if "build" not in service:
        return None
    return [str(arg) for arg in service["command"]]


def services_running(services: Mapping[str, Any], command: str) -> dict[str, dict[str, Any]]:
    return {name: s for name, s in services.items() if (xoogify_command(s) or [""])[0] == command}


def option(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1]


def binary(name: str) -> str:
    found = Path(sys.executable).parent / name
    path = str(found) if found.exists() else shutil.which(name)
    assert path, f"{name} is a dev dependency (pyproject.toml); it is missing"
    return path


# --- the Compose file is valid ----------------------------------------------------------------


def test_compose_file_is_valid_for_the_compose_specification(compose: dict[str, Any]) -> None:
    validate_compose(compose)


@pytest.mark.parametrize(
    ("path", "bad"),
    [
        (("services", "proxy", "healthcheck", "interval"), "every five seconds"),
        (("services", "gateway-1", "depends_on", "migrate", "condition"), "service_done"),
        (("services", "postgres", "restart"), "sometimes"),
        (("services", "nats-1", "ports"), ["127.0.0.1:nats:4222"]),
    ],
)
def test_the_validator_rejects_a_broken_copy(
    compose: dict[str, Any], path: tuple[str, ...], bad: Any
) -> None:
    broken = copy.deepcopy(compose)
    node = broken
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = bad
    with pytest.raises(ValueError):
        validate_compose(broken)


def test_compose_refuses_to_start_without_the_secrets() -> None:
    required = {name for name, op in variables_in(raw_compose()) if op == ":?"}
    assert {
        "XOOGIFY_POSTGRES_PASSWORD",
        "XOOGIFY_STATE_SECRET",
        "XOOGIFY_NATS_PASSWORD_GATEWAY",
        "XOOGIFY_NATS_PASSWORD_SCHEDULER",
        "XOOGIFY_NATS_PASSWORD_RUNNER",
        "XOOGIFY_NATS_PASSWORD_SUBSCRIBERS_ADMIN",
        "XOOGIFY_SECRETS_PUBLIC_KEY",
        "XOOGIFY_SECRETS_PRIVATE_KEY",
        "XOOGIFY_STATE_KEY",
    } <= required
    with pytest.raises(InterpolationError, match="XOOGIFY_"):
        interpolate(raw_compose(), {})


def test_every_variable_is_documented_in_env_example() -> None:
    documented = env_example()
    used = {name for name, _ in variables_in(raw_compose())}
    assert used - set(documented) == set()
    # Secrets are left empty in the example (an operator must choose them).
    for name, value in documented.items():
        if SECRET_NAME.search(name):
            assert value == "", name


def test_interpolation_follows_compose_rules() -> None:
    env = {"SET": "x", "EMPTY": ""}
    assert interpolate_text("${SET:-d} ${EMPTY:-d} ${EMPTY-d} ${UNSET-d} $$SET $SET", env) == (
        "x d  d $SET x"
    )
    assert interpolate_text("${SET:+alt}${EMPTY:+alt}", env) == "alt"
    with pytest.raises(InterpolationError):
        interpolate_text("${EMPTY:?needed}", env)
    with pytest.raises(InterpolationError):
        interpolate_text("cost: $5", env)


# --- secrets ---------------------------------------------------------------------------------


def _secret_literals(node: Any, where: str = "") -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            here = f"{where}.{key}"
            if isinstance(value, str | int) and SECRET_NAME.search(str(key)):
                if not re.fullmatch(r"\$\{[A-Z0-9_]+(:?\?[^}]*)?\}", str(value)):
                    yield here
            yield from _secret_literals(value, here)
    elif isinstance(node, list):
        for i, item in enumerate(node):
            yield from _secret_literals(item, f"{where}[{i}]")
    elif isinstance(node, str):
        # user:password@ in a URL; the password may be a ${VAR:?message} with spaces.
        for match in re.finditer(r"[a-z]+://[^:/@\s]+:(\$\{[^}]*\}|[^@\s/]*)@", node):
            if not match[1].startswith("${"):
                yield f"{where}: {match[0]}"


def test_no_secret_is_written_in_the_compose_file() -> None:
    assert list(_secret_literals(raw_compose())) == []
    # The check itself finds a literal.
    leaked = {"services": {"x": {"environment": {"DB": "postgresql://u:hunter2@db/x"}}}}
    assert list(_secret_literals(leaked)) != []
    assert list(_secret_literals({"environment": {"XOOGIFY_STATE_SECRET": "abc"}})) != []
    url = "nats://runner:${XOOGIFY_NATS_PASSWORD_RUNNER:?set in .env}@nats-1:4222"
    assert list(_secret_literals({"environment": {"XOOGIFY_NATS_URL": url}})) == []


def test_env_files_are_ignored_by_git_and_kept_out_of_the_image(
    services: dict[str, Any],
) -> None:
    env_files = {
        item["path"] if isinstance(item, dict) else item
        for service in services.values()
        for item in service.get("env_file", [])
    } | {".env"}
    for path in env_files:
        ignored = subprocess.run(
            ["git", "check-ignore", "-q", path], cwd=REPO_ROOT, check=False
        ).returncode
        assert ignored == 0, f"{path} must be in .gitignore"
        assert dockerignored(path), f"{path} must be in .dockerignore"
    assert (
        subprocess.run(
            ["git", "check-ignore", "-q", ".env.example"], cwd=REPO_ROOT, check=False
        ).returncode
        == 1
    )


# --- dependencies and health ----------------------------------------------------------------


def test_depends_on_targets_exist_and_can_be_waited_for(services: dict[str, Any]) -> None:
    for name, service in services.items():
        for target, spec in (service.get("depends_on") or {}).items():
            assert target in services, f"{name} depends on unknown {target}"
            condition = spec["condition"]
            if condition == "service_healthy":
                assert "healthcheck" in services[target], f"{target} has no healthcheck"
            elif condition == "service_completed_successfully":
                assert services[target].get("restart") == "no", f"{target} is not a one-shot"
            else:
                pytest.fail(f"{name} → {target}: wait for health or completion, not {condition}")


def test_every_long_running_service_has_a_healthcheck(services: dict[str, Any]) -> None:
    for name, service in services.items():
        if service.get("restart") != "no":
            assert "test" in service.get("healthcheck", {}), name


def test_migrations_run_before_any_gateway(services: dict[str, Any]) -> None:
    gateways = services_running(services, "gateway")
    assert len(gateways) >= 2
    for service in gateways.values():
        assert service["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert xoogify_command(services["migrate"]) == ["migrate"]


def test_every_command_is_one_the_cli_accepts(services: dict[str, Any]) -> None:
    """Each xoogify service's command parses, and its health check asks the port it serves."""
    commands = set()
    for name, service in services.items():
        args = xoogify_command(service)
        if args is None:
            continue
        parsed = build_parser().parse_args(args)  # SystemExit (a failure) on a bad option
        commands.add(parsed.command)
        check = " ".join(service.get("healthcheck", {}).get("test", []))
        port = getattr(parsed, "port", None) or getattr(parsed, "metrics_port", None)
        if service.get("restart") != "no":
            assert port and f"127.0.0.1:{port}/" in check, name
    assert {"gateway", "scheduler", "runner", "migrate", "nats-config"} <= commands
    with pytest.raises(SystemExit):
        build_parser().parse_args(["scheduler", "--metrics-prot", "9100"])


# --- what each service is given -------------------------------------------------------------


def nats_users_and_hosts(url: str) -> tuple[set[str], set[str]]:
    parts = [urlsplit(u.strip()) for u in url.split(",")]
    return {p.username or "" for p in parts}, {p.hostname or "" for p in parts}


def nats_nodes(services: dict[str, Any]) -> set[str]:
    return {name for name, s in services.items() if str(s.get("image", "")).startswith("nats:")}


@pytest.mark.parametrize(
    ("command", "user", "needs_database", "needs_state_secret"),
    [
        ("gateway", "gateway", True, True),
        ("scheduler", "scheduler", False, True),
        ("runner", "runner", False, False),
        # The database only to read the watermark after a lost store (store_reset.py).
        ("subscriber-stream", nats_auth.SUBSCRIBERS_ADMIN, True, False),
        ("migrate", None, True, False),
    ],
)
def test_each_service_gets_what_it_needs_and_no_more(
    services: dict[str, Any],
    env: dict[str, str],
    command: str,
    user: str | None,
    needs_database: bool,
    needs_state_secret: bool,
) -> None:
    running = services_running(services, command)
    assert running, command
    for name, service in running.items():
        service_env = environment(service)
        settings = Settings.from_env(service_env)
        if user is None:
            assert "XOOGIFY_NATS_URL" not in service_env, name
        else:
            users, hosts = nats_users_and_hosts(service_env["XOOGIFY_NATS_URL"])
            assert users == {user}, name
            assert hosts and hosts <= nats_nodes(services), name
            # The password is that user's, as nats-config writes it into the servers.
            password = urlsplit(service_env["XOOGIFY_NATS_URL"].split(",")[0]).password
            assert password == env[nats_cluster.password_variable(user)], name
            assert nats_auth.inbox_prefix_for_url(settings.nats_url) == f"_INBOX_{user}"
            assert service_env.get("XOOGIFY_STREAM_REPLICAS") == "3", name
            assert "bus" in service["networks"], name
        if needs_database:
            db = urlsplit(settings.database_url)
            assert db.hostname == "postgres" and db.password == env["XOOGIFY_POSTGRES_PASSWORD"]
            assert "db" in service["networks"], name
        else:
            assert "XOOGIFY_DATABASE_URL" not in service_env, name
            assert "db" not in service.get("networks", []), name
        assert bool(settings.state_secret) == needs_state_secret, name
        if needs_state_secret:
            assert settings.state_secret == env["XOOGIFY_STATE_SECRET"]


def test_every_nats_node_sees_all_the_others(services: dict[str, Any]) -> None:
    nodes = nats_nodes(services)
    assert len(nodes) == 3
    for command in ("gateway", "scheduler", "runner"):
        for name, service in services_running(services, command).items():
            _, hosts = nats_users_and_hosts(environment(service)["XOOGIFY_NATS_URL"])
            assert hosts == nodes, f"{name} should list every NATS node"


def test_gateways_have_their_own_ids_and_streams_agree(services: dict[str, Any]) -> None:
    gateways = services_running(services, "gateway")
    ids = [environment(s).get("XOOGIFY_GATEWAY_ID") for s in gateways.values()]
    assert None not in ids and len(set(ids)) == len(ids)
    stream_settings = {
        (
            environment(s).get("XOOGIFY_STREAM_REPLICAS"),
            Settings.from_env(environment(s)).events_max_age_s,
            Settings.from_env(environment(s)).logs_max_age_s,
        )
        for s in services.values()
        if environment(s).get("XOOGIFY_NATS_URL")
    }
    assert len(stream_settings) == 1


def test_runners_per_architecture(services: dict[str, Any]) -> None:
    runners = services_running(services, "runner")
    arches = set()
    for name, service in runners.items():
        args = xoogify_command(service) or []
        arch = option(args, "--arch")
        arches.add(arch)
        assert service["platform"] == f"linux/{arch}", name
        assert service["build"]["target"] == "runner", name
        # --scale needs no fixed name and no host port.
        assert "container_name" not in service and "ports" not in service, name
        # The job's drain fits in the time Docker waits before SIGKILL.
        drain = float(environment(service)["XOOGIFY_DRAIN_TIMEOUT_S"])
        grace = service["stop_grace_period"]
        assert grace.endswith("s") and float(grace[:-1]) > drain, name
        # Terraform state goes through the proxy, which the runner can reach.
        gateway = urlsplit(Settings.from_env(environment(service)).gateway_url)
        assert gateway.hostname in services and "edge" in services[gateway.hostname]["networks"]
        assert "edge" in service["networks"], name
        modules = environment(service)["XOOGIFY_MODULES_DIR"]
        assert any(v.split(":")[1] == modules for v in service["volumes"]), name
    assert set(ARCHES) <= arches


def test_schedulers_give_runners_a_reachable_state_backend(services: dict[str, Any]) -> None:
    schedulers = services_running(services, "scheduler")
    assert len(schedulers) >= 2
    for service in schedulers.values():
        assert urlsplit(Settings.from_env(environment(service)).gateway_url).hostname == "proxy"


# --- volumes ----------------------------------------------------------------------------------


def test_volumes_are_declared_and_bind_mounts_exist(compose: dict[str, Any]) -> None:
    declared = set(compose.get("volumes", {}))
    used = set()
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith((".", "/")):
                assert (REPO_ROOT / source).exists(), f"{name}: {source} missing"
            else:
                assert source in declared, f"{name}: volume {source} not declared"
                used.add(source)
    assert declared == used
    assert any(v.startswith("pg-data:") for v in compose["services"]["postgres"]["volumes"])


# --- NATS: what nats-config writes, as the nodes read it ------------------------------------


def test_nats_config_writes_what_each_node_is_started_with(
    services: dict[str, Any], env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    init = services["nats-config"]
    args = xoogify_command(init) or []
    out_dir = option(args, "--out-dir")
    assert f"nats-config:{out_dir}" in init["volumes"]
    assert set(option(args, "--nodes").split(",")) == nats_nodes(services)
    store_dir = option(args, "--store-dir")
    for name in nats_nodes(services):
        node = services[name]
        assert node["depends_on"]["nats-config"]["condition"] == "service_completed_successfully"
        config_dir, conf = node["command"][1].rsplit("/", 1)
        assert conf == f"{name}.conf"
        assert f"nats-config:{config_dir}:ro" in node["volumes"]
        assert any(store_dir.startswith(v.split(":")[1]) for v in node["volumes"] if "data" in v)

    # Run the command compose runs, with the env file, into a temporary dir.
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    local = [str(tmp_path) if a == out_dir else a for a in args]
    assert xoogify_main(local) == 0
    nats_server = find_nats_server()
    for name in nats_nodes(services):
        path = tmp_path / f"{name}.conf"
        checked = subprocess.run(
            [nats_server, "-t", "-c", str(path)], capture_output=True, text=True, check=False
        )
        assert checked.returncode == 0, checked.stderr
        text = path.read_text()
        assert f'"server_name": "{name}"' in text or f'server_name: "{name}"' in text
        # Every subscriber organization of .env has its user.
        assert '"user": "sub-acme"' in text and '"user": "sub-globex"' in text
        for peer in nats_nodes(services) - {name}:
            assert f"@{peer}:6222" in text


def test_nats_config_names_every_missing_password(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for key in list(filled_env()):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("XOOGIFY_NATS_PASSWORD_GATEWAY", "g")
    code = xoogify_main(["nats-config", "--out-dir", str(tmp_path), "--nodes", "a,b"])
    assert code == 2
    err = capsys.readouterr().err
    assert "XOOGIFY_NATS_PASSWORD_RUNNER" in err and "XOOGIFY_NATS_PASSWORD_GATEWAY" not in err
    assert list(tmp_path.iterdir()) == []


# --- the reverse proxy --------------------------------------------------------------------------


def test_caddyfile_is_valid_and_balances_the_gateways(services: dict[str, Any]) -> None:
    proxy = services["proxy"]
    assert "./deploy/Caddyfile:/etc/caddy/Caddyfile:ro" in proxy["volumes"]
    # `adapt` parses with Caddy's own Caddyfile adapter (unknown directives fail) and does
    # not start anything.
    adapted = subprocess.run(
        [binary("caddy"), "adapt", "--config", str(CADDYFILE), "--adapter", "caddyfile"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert adapted.returncode == 0, adapted.stderr
    config = json.loads(adapted.stdout)
    (server,) = config["apps"]["http"]["servers"].values()
    (route,) = server["routes"]
    (handler,) = route["handle"]
    assert handler["handler"] == "reverse_proxy"
    upstreams = {u["dial"] for u in handler["upstreams"]}
    gateways = services_running(services, "gateway")
    assert upstreams == {
        f"{name}:{option(xoogify_command(s) or [], '--port')}" for name, s in gateways.items()
    }
    assert handler["health_checks"]["active"]["uri"] == "/readyz"
    # The port it listens on is the one compose publishes.
    (listen,) = server["listen"]
    assert any(p.endswith(":" + listen.rsplit(":", 1)[1]) for p in proxy["ports"])
    assert set(proxy["networks"]) == {"edge"}


def test_a_broken_caddyfile_is_refused(tmp_path: Path) -> None:
    broken = tmp_path / "Caddyfile"
    broken.write_text(CADDYFILE.read_text().replace("lb_policy", "lb_polcy"))
    adapted = subprocess.run(
        [binary("caddy"), "adapt", "--config", str(broken), "--adapter", "caddyfile"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert adapted.returncode != 0


# --- the Dockerfile ---------------------------------------------------------------------------


def dockerignore_patterns() -> list[tuple[bool, str]]:
    patterns = []
    for line in (REPO_ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            negated = line.startswith("!")
            patterns.append((negated, line.lstrip("!").strip("/")))
    return patterns


def _glob_regex(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern (Go filepath.Match plus `**`) as a regular expression."""
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + r"\Z")


def dockerignored(path: str) -> bool:
    """Docker's rule: the last matching pattern wins; a folder's pattern covers its files."""
    parts = Path(path.strip("/").removeprefix("./")).parts
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for negated, pattern in dockerignore_patterns():
        if any(_glob_regex(pattern).match(p) for p in prefixes):
            ignored = not negated
    return ignored


def stages() -> list[dict[str, Any]]:
    """Each stage: name, base (image or stage), instructions."""
    out: list[dict[str, Any]] = []
    for command in dockerfile.parse_file(str(DOCKERFILE)):
        if command.cmd.upper() == "FROM":
            value = command.value
            name = value[2] if len(value) > 2 and value[1].upper() == "AS" else None
            out.append({"name": name, "base": value[0], "commands": []})
        elif out:
            out[-1]["commands"].append(command)
    return out


def stage_chain(name: str) -> list[dict[str, Any]]:
    """A stage and the stages it is built on, nearest first."""
    by_name = {s["name"]: s for s in stages() if s["name"]}
    chain = []
    while name in by_name:
        chain.append(by_name[name])
        name = by_name[name]["base"]
    return chain


def test_dockerfile_passes_hadolint() -> None:
    linted = subprocess.run(
        [binary("hadolint"), "--format", "json", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert json.loads(linted.stdout or "[]") == [], linted.stdout
    assert linted.returncode == 0


def test_hadolint_would_catch_a_root_image(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:3.11-slim\nUSER root\nRUN cd /tmp && ls\n")
    linted = subprocess.run(
        [binary("hadolint"), "--format", "json", str(bad)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert {finding["code"] for finding in json.loads(linted.stdout)} >= {"DL3002", "DL3003"}


def test_dockerfile_is_multi_stage_and_compose_targets_exist(services: dict[str, Any]) -> None:
    names = {s["name"] for s in stages()}
    assert len(stages()) >= 3
    targets = {s["build"]["target"] for s in services.values() if "build" in s}
    assert targets == {"service", "runner"}
    assert targets <= names
    for service in services.values():
        if "build" in service:
            assert service["build"]["context"] == "."


@pytest.mark.parametrize("target", ["service", "runner"])
def test_images_run_as_a_non_root_user(target: str) -> None:
    users = [
        c.value[0]
        for stage in stage_chain(target)
        for c in reversed(stage["commands"])
        if c.cmd.upper() == "USER"
    ]
    assert users, f"{target} sets no USER"
    user = users[0].split(":")[0]
    assert user not in ("root", "0")


def test_the_runner_image_has_terraform_or_opentofu() -> None:
    runner = stage_chain("runner")
    copied = [
        (c.flags, c.value) for stage in runner for c in stage["commands"] if c.cmd.upper() == "COPY"
    ]
    tofu = [
        (flags, value) for flags, value in copied if value[-1].endswith(("/tofu", "/terraform"))
    ]
    assert tofu, "the runner stage installs no tofu/terraform binary"
    (flags, value) = tofu[0]
    source_stage = next(f.split("=", 1)[1] for f in flags if f.startswith("--from="))
    base = next(s["base"] for s in stages() if s["name"] == source_stage)
    assert "opentofu" in base or "terraform" in base
    assert value[-1].startswith(("/usr/local/bin/", "/usr/bin/"))  # on PATH


def test_copy_sources_exist_and_are_in_the_build_context() -> None:
    for stage in stages():
        for c in stage["commands"]:
            if c.cmd.upper() not in ("COPY", "ADD") or any(
                f.startswith("--from=") for f in c.flags
            ):
                continue
            for source in c.value[:-1]:
                assert (REPO_ROOT / source).exists(), f"COPY {source}: not in the repository"
                assert not dockerignored(source), f"COPY {source}: excluded by .dockerignore"


def test_dockerignore_matching() -> None:
    assert dockerignored(".env") and dockerignored(".venv/bin/python")
    assert dockerignored("services/common/__pycache__/x.pyc")
    assert not dockerignored("services/common/config.py")
    assert not dockerignored(".env.example")

"""NATS users and subject permissions per role, rendered as a nats-server config file.

Roles: `gateway`, `scheduler`, `runner`, and one `sub-<organization>` per organization that
may only read its own job events. Every permission is written against the names in
`Subjects`, so a prefix other than `xoogify` works the same. docs/security.md explains the
choices (why JetStream API subjects are scoped per stream, the per-user inbox prefixes, the
fixed consumer names of subscribers).

Pure: no I/O except the two small helpers at the end that keep passwords in a file.
"""

from __future__ import annotations

import json
import os
import re
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, urlsplit

import nats
from nats.js.errors import BadRequestError

from services.common.config import Settings
from services.common.subjects import Subjects

SERVICE_ROLES = ("gateway", "scheduler", "runner")
SUBSCRIBER_PREFIX = "sub-"
SUBSCRIBERS_ADMIN = "subscribers-admin"
# A subscriber names its consumer `sub-<org>-<n>` with n below this; see consumer_names().
SUBSCRIBER_CONSUMER_SLOTS = 8

API = "$JS.API"


# CONTRACT.md's names: they become subject tokens and config strings, so nothing else passes.
_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")


def subscriber_user(organization: str) -> str:
    if not _NAME.fullmatch(organization):
        raise ValueError(f"not an organization name: {organization!r}")
    return f"{SUBSCRIBER_PREFIX}{organization}"


def inbox_prefix(user: str) -> str:
    """Each user gets its own reply/delivery subjects, so none can read another's replies."""
    return f"_INBOX_{user}"


def inbox_prefix_for_url(url: str) -> str | None:
    """The inbox prefix to connect with, from the user named in a NATS URL (None without one)."""
    user = urlsplit(url.split(",")[0].strip()).username
    return inbox_prefix(user) if user else None


def consumer_names(organization: str, slots: int = SUBSCRIBER_CONSUMER_SLOTS) -> list[str]:
    """The only consumer names an organization's subscriber may create on the events stream.

    A wildcard name would let it overwrite (create-or-update) the gateway's own consumers.
    """
    return [f"{subscriber_user(organization)}-{n}" for n in range(slots)]


@dataclass(frozen=True)
class Permissions:
    publish: list[str] = field(default_factory=list)
    subscribe: list[str] = field(default_factory=list)
    allow_responses: bool = False

    def as_dict(self) -> dict[str, object]:
        out: dict[str, object] = {
            "publish": {"allow": sorted(set(self.publish))},
            "subscribe": {"allow": sorted(set(self.subscribe))},
        }
        if self.allow_responses:
            out["allow_responses"] = True
        return out


# --- JetStream API building blocks ----------------------------------------------------------


def _stream_info(*streams: str) -> list[str]:
    return [f"{API}.STREAM.INFO.{s}" for s in streams]


def _stream_create(*streams: str) -> list[str]:
    return [f"{API}.STREAM.CREATE.{s}" for s in streams]


def _stream_update(*streams: str) -> list[str]:
    return [f"{API}.STREAM.UPDATE.{s}" for s in streams]


def _stream_purge(*streams: str) -> list[str]:
    return [f"{API}.STREAM.PURGE.{s}" for s in streams]


def _consumers(stream: str, *, pull: bool = True, delete: bool = True) -> list[str]:
    """Create (every nats-py form), look up, delete, pull from and ack consumers of a stream."""
    out = [
        f"{API}.CONSUMER.CREATE.{stream}",  # ephemeral, filter in the body (ordered consumers)
        f"{API}.CONSUMER.CREATE.{stream}.>",  # named, with or without filter in the subject
        f"{API}.CONSUMER.DURABLE.CREATE.{stream}.*",  # durable, legacy form
        f"{API}.CONSUMER.INFO.{stream}.*",
        f"$JS.ACK.{stream}.>",
        f"$JS.FC.{stream}.>",  # flow-control replies of push (ordered) consumers
    ]
    if pull:
        out.append(f"{API}.CONSUMER.MSG.NEXT.{stream}.*")
    if delete:
        out.append(f"{API}.CONSUMER.DELETE.{stream}.*")
    return out


def _kv_stream(bucket: str) -> str:
    return f"KV_{bucket}"


def _kv_read(bucket: str) -> list[str]:
    kv = _kv_stream(bucket)
    return [
        *_stream_info(kv),
        f"{API}.DIRECT.GET.{kv}",
        f"{API}.DIRECT.GET.{kv}.>",
        f"{API}.STREAM.MSG.GET.{kv}",
        # keys() and watch() are ordered consumers on the bucket's stream.
        *_consumers(kv, pull=False),
    ]


def _kv_write(bucket: str) -> list[str]:
    return [f"$KV.{bucket}.>"]


def _kv_create(bucket: str) -> list[str]:
    kv = _kv_stream(bucket)
    return [*_stream_info(kv), *_stream_create(kv)]


def _main_streams(s: Subjects) -> list[str]:
    return [s.submit_stream, s.events_stream, s.logs_stream, s.dispatch_stream, s.reports_stream]


def _work_streams(s: Subjects) -> list[str]:
    """The streams any service may make; the others only the gateway (bus.ensure_streams)."""
    return [name for name in _main_streams(s) if name not in s.numbered_by_postgres]


# --- roles ----------------------------------------------------------------------------------


def gateway_permissions(s: Subjects) -> Permissions:
    streams = _main_streams(s)
    publish = [
        s.submit,
        s.control_cancel,
        # Every service runs bus.ensure_streams at start-up (any may start first); only
        # the gateway makes the streams numbered by Postgres.
        *_stream_create(*streams),
        *_stream_update(*streams),
        *_stream_info(s.submit_stream, s.events_stream, s.logs_stream),
        f"{API}.STREAM.MSG.GET.{s.submit_stream}",  # a duplicate submission's stored body
        *_consumers(s.events_stream),
        *_consumers(s.logs_stream),
        *_kv_read(s.runners_bucket),
        # After a lost store: numbering continues past what Postgres holds, and the
        # scheduler's bucket tells whether its records are gone too (gateway/store_reset.py).
        *_stream_purge(s.submit_stream, s.events_stream, s.logs_stream),
        *_stream_info(_kv_stream(s.sched_bucket)),
    ]
    return Permissions(publish=publish, subscribe=[f"{inbox_prefix('gateway')}.>"])


def scheduler_permissions(s: Subjects) -> Permissions:
    publish = [
        f"{s.prefix}.events.>",
        s.dispatch_all,
        f"{s.prefix}.cancel.>",
        *_stream_create(*_work_streams(s)),
        *_stream_update(*_work_streams(s)),
        *_stream_info(*_main_streams(s)),
        *_consumers(s.submit_stream),
        *_consumers(s.reports_stream),
        # The dispatch consumers are created by whoever comes first; it never pulls them.
        *_consumers(s.dispatch_stream, pull=False, delete=False),
        f"{API}.STREAM.MSG.DELETE.{s.dispatch_stream}",  # a dispatch of a cancelled job
        f"{API}.STREAM.MSG.GET.{s.events_stream}",  # the last event published for a job
    ]
    for bucket in (s.sched_bucket, s.leader_bucket):
        publish += [
            *_kv_create(bucket),
            *_kv_read(bucket),
            *_kv_write(bucket),
            f"{API}.STREAM.PURGE.{_kv_stream(bucket)}",
        ]
    publish += [*_kv_create(s.runners_bucket), *_kv_read(s.runners_bucket)]
    subscribe = [s.claim, s.control_cancel, f"{inbox_prefix('scheduler')}.>"]
    # Replies to claims and cancel requests go to the requester's inbox.
    return Permissions(publish=publish, subscribe=subscribe, allow_responses=True)


def runner_permissions(s: Subjects) -> Permissions:
    own = [s.dispatch_stream, s.logs_stream, s.reports_stream]
    publish = [
        s.logs_all,
        s.reports_all,
        s.claim,
        # ensure_streams creates the work streams if missing; a create of an existing
        # stream with the same config only answers its info (never messages).
        *_stream_create(*_work_streams(s)),
        *_stream_update(*_work_streams(s)),
        *_stream_info(*own),
        *_consumers(s.dispatch_stream, delete=False),
        *_kv_create(s.runners_bucket),
        *_kv_write(s.runners_bucket),
    ]
    subscribe = [f"{s.prefix}.cancel.>", f"{inbox_prefix('runner')}.>"]
    return Permissions(publish=publish, subscribe=subscribe)


def subscriber_permissions(s: Subjects, organization: str) -> Permissions:
    """Read `<prefix>.events.<org>.>` live (core) or from a stream sequence (JetStream).

    Subscribers live in their own account (see server_config), so whatever a consumer's
    deliver subject says, nothing reaches the services. Only the named form of consumer
    creation carries the filter in the subject (`$JS.API.CONSUMER.CREATE.<stream>.<name>.
    <filter>`; the server refuses a body whose filter differs), so it is the only form
    allowed, with names of this organization only: a wildcard name would let one
    organization take over another's consumer.
    """
    own = s.events_filter(organization)
    stream = s.events_stream
    # Stream info (first/last sequence, for gap checks) tells totals across organizations,
    # never a message.
    publish = [f"$JS.FC.{stream}.>", *_stream_info(stream)]
    for name in consumer_names(organization):
        publish += [
            f"{API}.CONSUMER.CREATE.{stream}.{name}.{own}",
            f"{API}.CONSUMER.INFO.{stream}.{name}",
            f"{API}.CONSUMER.DELETE.{stream}.{name}",
            f"{API}.CONSUMER.MSG.NEXT.{stream}.{name}",
            f"$JS.ACK.{stream}.{name}.>",
        ]
    subscribe = [own, f"{inbox_prefix(subscriber_user(organization))}.>"]
    return Permissions(publish=publish, subscribe=subscribe)


def subscribers_admin_permissions(s: Subjects) -> Permissions:
    """`xoogify up` creates the subscribers' copy of the events stream with this user."""
    stream = s.events_stream
    publish = [
        *_stream_create(stream),
        *_stream_update(stream),
        *_stream_info(stream),
        *_stream_purge(stream),  # numbering on after a lost store (gateway/store_reset.py)
    ]
    return Permissions(publish=publish, subscribe=[f"{inbox_prefix(SUBSCRIBERS_ADMIN)}.>"])


def role_permissions(s: Subjects, user: str) -> Permissions:
    if user == "gateway":
        return gateway_permissions(s)
    if user == "scheduler":
        return scheduler_permissions(s)
    if user == "runner":
        return runner_permissions(s)
    if user == SUBSCRIBERS_ADMIN:
        return subscribers_admin_permissions(s)
    if user.startswith(SUBSCRIBER_PREFIX):
        return subscriber_permissions(s, user[len(SUBSCRIBER_PREFIX) :])
    raise ValueError(f"unknown NATS role: {user}")


def users_for(organizations: Iterable[str]) -> list[str]:
    return [*SERVICE_ROLES, SUBSCRIBERS_ADMIN, *(subscriber_user(org) for org in organizations)]


def account_names(s: Subjects) -> tuple[str, str]:
    """(services account, subscribers account)."""
    base = s.prefix.upper().replace("-", "_")
    return base, f"{base}_SUBSCRIBERS"


def server_config(
    subjects: Subjects,
    passwords: Mapping[str, str],
    store_dir: Path | None = None,
) -> str:
    """nats-server config text: JetStream on, two accounts, one user per entry of `passwords`.

    The services' account holds every stream. Subscribers sit in a second account that
    imports only `<prefix>.events.>` and keeps its own copy of the events stream (same
    name, same subjects, created by `ensure_subscriber_stream`): a consumer created there
    can deliver only inside that account, never into a subject a service reads.

    The config syntax accepts JSON values, so every value is written with json.dumps:
    subjects such as `$JS.API.>` stay quoted (an unquoted `$` is a variable reference).
    """
    services, subscribers = account_names(subjects)
    service_users: list[dict[str, object]] = []
    subscriber_users: list[dict[str, object]] = []
    for user in sorted(passwords):
        entry: dict[str, object] = {
            "user": user,
            "password": passwords[user],
            "permissions": role_permissions(subjects, user).as_dict(),
        }
        (service_users if user in SERVICE_ROLES else subscriber_users).append(entry)
    events = subjects.events_filter()
    accounts = {
        services: {
            "jetstream": "enabled",
            "users": service_users,
            "exports": [{"stream": events, "accounts": [subscribers]}],
        },
        subscribers: {
            "jetstream": "enabled",
            "users": subscriber_users,
            "imports": [{"stream": {"account": services, "subject": events}}],
        },
    }
    jetstream: dict[str, str] = {}
    if store_dir is not None:
        jetstream["store_dir"] = str(store_dir)
    lines = [
        "# Generated by services.common.nats_auth: edit the roles there, not here.",
        f"jetstream: {json.dumps(jetstream)}",
        f"accounts: {json.dumps(accounts, indent=2)}",
        "",
    ]
    return "\n".join(lines)


def user_url(server_url: str, user: str, password: str) -> str:
    """`nats://user:password@host:port` from a server URL without credentials."""
    parts = urlsplit(server_url)
    netloc = f"{quote(user, safe='')}:{quote(password, safe='')}@{parts.hostname}"
    if parts.port:
        netloc += f":{parts.port}"
    return parts._replace(netloc=netloc).geturl()


# --- passwords kept in the data dir ---------------------------------------------------------


def load_or_create_passwords(path: Path, users: Iterable[str]) -> dict[str, str]:
    """Random passwords per user, kept (0600) so a restart keeps every client's URL valid.

    A user missing from the file (a new organization) gets a new password; others are kept.
    """
    passwords: dict[str, str] = {}
    if path.exists():
        passwords = {str(k): str(v) for k, v in json.loads(path.read_text()).items()}
    wanted = list(users)
    changed = False
    for user in wanted:
        if user not in passwords:
            passwords[user] = secrets.token_hex(24)
            changed = True
    if changed or not path.exists():
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            json.dump(passwords, out, indent=2, sort_keys=True)
        os.replace(tmp, path)
    path.chmod(0o600)
    return {user: passwords[user] for user in wanted}


def write_server_config(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)
    path.chmod(0o600)


async def ensure_subscriber_stream(url: str, settings: Settings) -> None:
    """Create (or update) the subscribers' copy of the events stream, as subscribers-admin.

    Created before the services start, it holds every event from the first, so its stream
    sequences match those of the services' events stream.
    """
    from services.common import bus  # bus imports this module for inbox prefixes

    config = next(
        c for c in bus.stream_configs(settings) if c.name == settings.subjects.events_stream
    )
    nc = await nats.connect(url, inbox_prefix=inbox_prefix(SUBSCRIBERS_ADMIN))
    try:
        js = nc.jetstream()
        try:
            await js.add_stream(config)
        except BadRequestError:
            await js.update_stream(config)
    finally:
        await nc.close()

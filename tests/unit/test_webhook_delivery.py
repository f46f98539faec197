"""Webhooks without servers: signatures, backoff, what an attempt leaves behind, and the
validation of POST /api/webhooks."""

from __future__ import annotations

import hashlib
import hmac
from datetime import UTC, datetime, timedelta

import pytest

from services.gateway.errors import ApiError
from services.gateway.webhook_delivery import (
    WebhookConfig,
    backoff_s,
    delivery_headers,
    outcome,
    signature,
)
from services.gateway.webhooks import validate_create

T0 = datetime(2026, 11, 24, 7, 0, tzinfo=UTC)
CONFIG = WebhookConfig(backoff_s=1.0, retry_for_s=24 * 3600)
GOOD = {
    "organization": "acme",
    "url": "https://hooks.example.com/xoogify",
    "statuses": ["SUCCESS", "FAILURE"],
    "secret": "s3cret-s3cret",
}


def test_signature_is_hmac_sha256_of_timestamp_dot_body() -> None:
    body = b'{"build_id":1}'
    expected = hmac.new(b"topsecret", b"1700000000." + body, hashlib.sha256).hexdigest()
    assert signature("topsecret", 1700000000, body) == f"sha256={expected}"
    assert signature("othersecret", 1700000000, body) != f"sha256={expected}"


def test_delivery_headers() -> None:
    headers = delivery_headers("topsecret", "7-2", b"{}", 1700000000)
    assert headers["Content-Type"] == "application/json"
    assert headers["X-Xoogify-Timestamp"] == "1700000000"
    assert headers["X-Xoogify-Event-Id"] == "7-2"
    assert headers["X-Xoogify-Signature"] == signature("topsecret", 1700000000, b"{}")


def test_backoff_doubles_from_the_base_and_is_capped_at_an_hour() -> None:
    assert [backoff_s(n, 1.0) for n in range(1, 6)] == [1, 2, 4, 8, 16]
    assert backoff_s(3, 0.1) == pytest.approx(0.4)
    assert backoff_s(40, 1.0) == 3600
    assert backoff_s(1000, 1.0) == 3600  # no overflow


def test_a_2xx_is_delivered() -> None:
    result = outcome(2, T0, T0 + timedelta(seconds=5), 204, None, CONFIG)
    assert (result.status, result.attempts, result.delivered_at) == (
        "delivered",
        3,
        T0 + timedelta(seconds=5),
    )
    assert result.next_attempt_at is None and result.last_error is None


def test_a_failure_is_retried_later_with_the_reason() -> None:
    now = T0 + timedelta(seconds=10)
    result = outcome(2, T0, now, 500, None, CONFIG)
    assert result.status == "pending" and result.attempts == 3
    assert result.next_attempt_at == now + timedelta(seconds=4)
    assert (result.last_status_code, result.last_error) == (500, "HTTP 500")
    refused = outcome(0, T0, now, None, "ConnectError: refused", CONFIG)
    assert refused.last_error == "ConnectError: refused" and refused.status == "pending"


def test_redirects_are_failures_too() -> None:
    assert outcome(0, T0, T0, 302, None, CONFIG).status == "pending"


def test_gives_up_after_retrying_for_a_day() -> None:
    almost = outcome(20, T0, T0 + timedelta(hours=23, minutes=59), 503, None, CONFIG)
    assert almost.status == "pending"
    over = outcome(21, T0, T0 + timedelta(hours=24), 503, None, CONFIG)
    assert (over.status, over.next_attempt_at, over.last_status_code) == ("failed", None, 503)


def test_config_from_env() -> None:
    config = WebhookConfig.from_env({"XOOGIFY_WEBHOOK_BACKOFF_S": "0.05"})
    assert config.backoff_s == 0.05 and config.retry_for_s == 24 * 3600
    assert WebhookConfig.from_env({}).backoff_s == 1.0


def test_a_good_webhook_passes() -> None:
    assert validate_create(dict(GOOD)) == GOOD
    assert validate_create({**GOOD, "url": "http://127.0.0.1:9000/h?x=1"})["url"]


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"url": "ftp://example.com/x"}, "url"),
        ({"url": "https://"}, "url"),
        ({"url": "not a url"}, "url"),
        ({"statuses": ["DONE"]}, "statuses.0"),
        ({"statuses": []}, "statuses"),
        ({"statuses": ["SUCCESS", "SUCCESS"]}, "statuses"),
        ({"organization": "Acme.corp"}, "organization"),
        ({"secret": "short"}, "secret"),
        ({"secret": "x" * 257}, "secret"),
        ({"extra": 1}, "extra"),
    ],
)
def test_bad_webhooks_name_the_field(change: dict[str, object], field: str) -> None:
    with pytest.raises(ApiError) as caught:
        validate_create({**GOOD, **change})
    assert caught.value.status == 422
    assert caught.value.fields is not None and field in caught.value.fields
    assert "short" not in str(caught.value.fields)  # the secret is never echoed


def test_missing_fields_are_named() -> None:
    with pytest.raises(ApiError) as caught:
        validate_create({"organization": "acme"})
    assert caught.value.fields is not None
    assert {"url", "statuses", "secret"} <= set(caught.value.fields)

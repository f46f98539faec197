"""Which filter values (or workspace names) are refused as bad input, and which mean "any"."""

from __future__ import annotations

import pytest

from services.common.filters import invalid_values


@pytest.mark.parametrize(
    "values",
    [
        {},
        {"organization": None, "environment": "", "module_name": ""},
        {"organization": "acme", "environment": "stg-1", "module_name": "vpc_2"},
        {"module_type": "amd64/terraform", "q": "anything at all / 42"},
    ],
)
def test_valid_or_unset_values_pass(values: dict[str, str | None]) -> None:
    assert invalid_values(values) == {}


def test_each_bad_value_is_named() -> None:
    bad = invalid_values(
        {
            "organization": "Acme",
            "environment": "a.b",
            "module_name": "vpc\n",  # re.match with `$` would let this through
            "module_type": "amd64",
            "q": "x\x00",
        }
    )
    assert set(bad) == {"organization", "environment", "module_name", "module_type", "q"}


def test_names_longer_than_63_are_refused() -> None:
    assert invalid_values({"organization": "a" * 63}) == {}
    assert "organization" in invalid_values({"organization": "a" * 64})

"""Pure helpers of the pages: where the first paint of a log is cut, runners by arch."""

from __future__ import annotations

from services.gateway.pages import FIRST_LOG_BYTES, first_log_part, group_runners


def test_a_short_log_is_shown_whole() -> None:
    assert first_log_part("a\nb") == "a\nb"


def test_a_long_log_is_cut_at_a_line_end() -> None:
    text = ("x" * 99 + "\n") * (FIRST_LOG_BYTES // 100 + 5) + "\x1b[3"
    part = first_log_part(text)
    assert part.endswith("\n") and len(part) < len(text)
    assert "\x1b" not in part


def test_runners_grouped_by_arch_in_name_order() -> None:
    groups = group_runners(
        [
            {"runner_id": "b", "arch": "amd64"},
            {"runner_id": "c", "arch": "arm64"},
            {"runner_id": "a", "arch": "amd64"},
        ]
    )
    assert [(arch, [r["runner_id"] for r in rs]) for arch, rs in groups] == [
        ("amd64", ["a", "b"]),
        ("arm64", ["c"]),
    ]

"""ANSI SGR parsing for the job page's log: colours become classes, escape codes vanish."""

from __future__ import annotations

from services.gateway.ansi import Segment, Style, apply_sgr, parse


def test_plain_text_is_one_segment() -> None:
    segments, style = parse("hello\nworld\n")
    assert segments == [Segment("", "hello\nworld\n")]
    assert style == Style()


def test_colours_bold_and_reset() -> None:
    segments, style = parse("a\x1b[1;31mred\x1b[0m b \x1b[92mgreen")
    assert segments == [
        Segment("", "a"),
        Segment("fg-1 b", "red"),
        Segment("", " b "),
        Segment("fg-10", "green"),
    ]
    assert style.fg == 10


def test_style_carries_over_to_the_next_piece() -> None:
    _, style = parse("\x1b[33mwarn")
    segments, _ = parse(" more", style)
    assert segments == [Segment("fg-3", " more")]


def test_other_escapes_and_controls_are_removed() -> None:
    segments, _ = parse("\x1b[2K\x1b]0;title\x07x\x1b[?25ly\x07\x08z\r\n")
    assert "".join(s.text for s in segments) == "xyz\n"


def test_extended_colours() -> None:
    assert apply_sgr(Style(), "38;5;4").fg == 4
    assert apply_sgr(Style(), "38;5;200").fg is None
    # Truecolor parameters are consumed, not read as 1 (bold) or 2 (dim).
    style = apply_sgr(Style(), "38;2;1;2;3;4")
    assert style.underline and not style.bold and not style.dim


def test_a_cut_sequence_at_the_end_is_not_shown() -> None:
    segments, _ = parse("ok\x1b[3")
    assert segments == [Segment("", "ok")]


def test_markup_stays_text() -> None:
    segments, _ = parse("<script>alert(1)</script>")
    assert segments[0].text == "<script>alert(1)</script>"

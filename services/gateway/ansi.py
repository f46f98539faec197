"""ANSI SGR colours in log text, turned into styled segments for the job page.

Only SGR (`ESC [ … m`) becomes style; every other escape sequence and control character is
removed, so raw escape codes never reach the page. `web/static/ansi.js` applies the same
rules to the live part of the log; the CSS classes are shared (`fg-N`, `bg-N`, `b`, `d`,
`i`, `u`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

# CSI sequences (SGR among them), OSC strings, and other two-byte escapes.
_ESCAPE = re.compile(
    r"\x1b\[([0-?]*)[ -/]*([@-~])"
    r"|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)"
    r"|\x1b[@-Z\\-_]"
)
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


@dataclass(frozen=True)
class Style:
    fg: int | None = None
    bg: int | None = None
    bold: bool = False
    dim: bool = False
    italic: bool = False
    underline: bool = False

    def classes(self) -> str:
        names = []
        if self.fg is not None:
            names.append(f"fg-{self.fg}")
        if self.bg is not None:
            names.append(f"bg-{self.bg}")
        for flag, name in ((self.bold, "b"), (self.dim, "d"), (self.italic, "i")):
            if flag:
                names.append(name)
        if self.underline:
            names.append("u")
        return " ".join(names)


@dataclass(frozen=True)
class Segment:
    classes: str
    text: str


def _colour(params: list[int], i: int) -> tuple[int | None, int]:
    """An extended colour (38/48 ;5;n or ;2;r;g;b) starting at params[i]: the 16-colour
    index when it has one, and how many parameters it used."""
    if i + 1 < len(params) and params[i + 1] == 5 and i + 2 < len(params):
        n = params[i + 2]
        return (n if 0 <= n < 16 else None), 3
    if i + 1 < len(params) and params[i + 1] == 2:
        return None, 5
    return None, 1


def apply_sgr(style: Style, raw_params: str) -> Style:
    params = [int(p) if p.isdigit() else 0 for p in raw_params.split(";")] if raw_params else [0]
    i = 0
    while i < len(params):
        p = params[i]
        step = 1
        if p == 0:
            style = Style()
        elif p == 1:
            style = replace(style, bold=True)
        elif p == 2:
            style = replace(style, dim=True)
        elif p == 3:
            style = replace(style, italic=True)
        elif p == 4:
            style = replace(style, underline=True)
        elif p == 22:
            style = replace(style, bold=False, dim=False)
        elif p == 23:
            style = replace(style, italic=False)
        elif p == 24:
            style = replace(style, underline=False)
        elif 30 <= p <= 37:
            style = replace(style, fg=p - 30)
        elif 90 <= p <= 97:
            style = replace(style, fg=p - 90 + 8)
        elif p == 39:
            style = replace(style, fg=None)
        elif 40 <= p <= 47:
            style = replace(style, bg=p - 40)
        elif 100 <= p <= 107:
            style = replace(style, bg=p - 100 + 8)
        elif p == 49:
            style = replace(style, bg=None)
        elif p in (38, 48):
            colour, step = _colour(params, i)
            style = replace(style, fg=colour) if p == 38 else replace(style, bg=colour)
        i += step
    return style


def _clean(text: str) -> str:
    return _CONTROL.sub("", text.replace("\r\n", "\n"))


def parse(text: str, style: Style | None = None) -> tuple[list[Segment], Style]:
    """Split `text` into styled segments; also return the style in force at its end, to
    carry on with the next piece."""
    current = style or Style()
    segments: list[Segment] = []

    def emit(piece: str) -> None:
        piece = _clean(piece)
        if not piece:
            return
        classes = current.classes()
        if segments and segments[-1].classes == classes:
            segments[-1] = Segment(classes, segments[-1].text + piece)
        else:
            segments.append(Segment(classes, piece))

    pos = 0
    for match in _ESCAPE.finditer(text):
        emit(text[pos : match.start()])
        pos = match.end()
        if match.group(2) == "m":
            current = apply_sgr(current, match.group(1))
    rest = text[pos:]
    # A sequence cut at the end of the text is dropped rather than shown.
    cut = rest.rfind("\x1b")
    if cut != -1 and "\n" not in rest[cut:]:
        rest = rest[:cut]
    emit(rest)
    return segments, current

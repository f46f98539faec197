"""A scenario's result: its figures beside their targets, a rich table for people and one
JSON line for machines. Correctness (nothing missing) is part of the result; a time never
decides whether a run passed."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.table import Table

from services.common import codec


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100) of `values`; NaN when there are none."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return float(ordered[min(rank, len(ordered)) - 1])


@dataclass
class Result:
    scenario: str
    size: int
    # Ordered: the table shows them in this order. Values are numbers (or short text).
    figures: dict[str, Any] = field(default_factory=dict)
    # Figure name → the target as text ("≥ 25000/s"), shown beside it.
    targets: dict[str, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def problem(self, text: str) -> None:
        self.problems.append(text)

    def as_json(self) -> dict[str, Any]:
        figures = {k: _plain(v) for k, v in self.figures.items()}
        return {
            "scenario": self.scenario,
            "size": self.size,
            "ok": self.ok,
            "problems": self.problems,
            **figures,
        }


def _plain(value: Any) -> Any:
    # JSON has no NaN: an absent measurement is null.
    if isinstance(value, float):
        return None if math.isnan(value) else round(value, 3)
    return value


def _shown(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "—"
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:,.2f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def emit(result: Result, json_only: bool, console: Console | None = None) -> None:
    """Print the table (unless json_only), then the one JSON line, flushed."""
    if not json_only:
        console = console or Console(stderr=False)
        table = Table(title=f"{result.scenario} (size {result.size:,})")
        table.add_column("figure")
        table.add_column("measured", justify="right")
        table.add_column("target", justify="right")
        for name, value in result.figures.items():
            table.add_row(name, _shown(value), result.targets.get(name, ""))
        console.print(table)
        for note in result.notes:
            console.print(f"  note: {note}")
        verdict = "[green]correct[/]" if result.ok else "[red]INCORRECT[/]"
        console.print(f"  {verdict}" + "".join(f"\n  - {p}" for p in result.problems))
    print(codec.dumps_str(result.as_json()), flush=True)

"""Result rows, the comparison helper every scenario uses, and their table/JSON/PNG forms."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from .timing import Case, Spread, interleave, paired

__all__ = ["Figure", "Row", "Target", "compare", "draw_chart", "format_table", "to_json"]


@dataclass(frozen=True)
class Target:
    """``ratio <op> limit``; the ratio is sessionstore's figure over the baseline's.

    With ``absolute``, the limit bounds sessionstore's own figure instead (its
    median, in its unit: seconds for a latency): for the few targets stated as
    absolute times, which no baseline makes relative.
    """

    op: Literal["<=", ">="]
    limit: float
    text: str
    absolute: bool = False

    def met(self, ratio: float) -> bool:
        return ratio <= self.limit if self.op == "<=" else ratio >= self.limit


@dataclass(frozen=True)
class Figure:
    """A measured value in ``unit`` (``s``, ``ops/s``, ``B``, ``threads``, ``x``)."""

    median: float
    q1: float
    q3: float
    unit: str

    @classmethod
    def of(cls, spread: Spread, unit: str) -> Figure:
        return cls(spread.median, spread.q1, spread.q3, unit)

    @classmethod
    def exact(cls, value: float, unit: str) -> Figure:
        return cls(value, value, value, unit)

    def __str__(self) -> str:
        value = _human(self.median, self.unit)
        if self.q3 == self.q1:
            return value
        return f"{value} ±{_human((self.q3 - self.q1) / 2, self.unit, bare=True)}"


def _human(value: float, unit: str, *, bare: bool = False) -> str:
    if unit == "s":
        for scale, name in ((1.0, "s"), (1e-3, "ms"), (1e-6, "µs"), (1e-9, "ns")):
            if abs(value) >= scale or scale == 1e-9:
                return f"{value / scale:.3g} {name}"
    if unit == "B":
        for scale, name in ((1 << 20, "MiB"), (1 << 10, "KiB"), (1, "B")):
            if abs(value) >= scale or scale == 1:
                return f"{value / scale:.3g} {name}"
    if unit == "x":
        return f"{value:.3g}" if bare else f"{value:.3g}x"
    return f"{value:.3g}" if bare else f"{value:.3g} {unit}"


@dataclass
class Row:
    """One line of the table: sessionstore against a baseline, a ratio, a target."""

    scenario: str
    measure: str
    ours: Figure
    baseline: Figure | None = None
    baseline_name: str = "none (no meaningful baseline)"
    ratio: Figure | None = None
    target: Target | None = None
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    passed: bool | None = None
    """Set when the verdict needs more than the ratio (it then overrides the target check)."""

    @property
    def verdict(self) -> str:
        if self.passed is not None:
            return "PASS" if self.passed else "FAIL"
        if self.target is None:
            return "info"
        if self.target.absolute:
            return "PASS" if self.target.met(self.ours.median) else "FAIL"
        if self.ratio is None:
            return "info"
        return "PASS" if self.target.met(self.ratio.median) else "FAIL"


def compare(
    scenario: str,
    measure: str,
    ours: Case,
    base: Case,
    *,
    repeats: int,
    baseline_name: str,
    target: Target | None,
    throughput: bool = False,
    warmup: int = 1,
    note: str = "",
) -> Row:
    """Time ``ours`` and ``base`` interleaved; a row with their paired ratio.

    Times are per operation; with ``throughput`` the figures are operations per
    second and the ratio is ours over the baseline's throughput.
    """
    ours_t, base_t = interleave([ours, base], repeats=repeats, warmup=warmup)
    if throughput:

        def rate(spread: Spread) -> Figure:
            return Figure.of(spread.map(lambda s: 1.0 / s), "ops/s")

        ratio = paired(ours_t, base_t, lambda a, b: b / a)
        return Row(
            scenario,
            measure,
            rate(ours_t),
            rate(base_t),
            baseline_name,
            Figure.of(ratio, "x"),
            target,
            note,
        )
    ratio = paired(ours_t, base_t, lambda a, b: a / b)
    return Row(
        scenario,
        measure,
        Figure.of(ours_t, "s"),
        Figure.of(base_t, "s"),
        baseline_name,
        Figure.of(ratio, "x"),
        target,
        note,
    )


# -- table ----------------------------------------------------------------------------

_COLUMNS = ("scenario", "sessionstore", "baseline", "ratio", "target", "result")


def format_table(rows: Sequence[Row]) -> str:
    """A plain-text table (medians ± half the IQR), then one line per baseline/note."""
    cells = [
        (
            f"{row.scenario}: {row.measure}",
            str(row.ours),
            str(row.baseline) if row.baseline is not None else "n/a",
            str(row.ratio) if row.ratio is not None else "-",
            row.target.text if row.target is not None else "-",
            row.verdict,
        )
        for row in rows
    ]
    widths = [max(len(c[i]) for c in [_COLUMNS, *cells]) for i in range(len(_COLUMNS))]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.ljust(w) for v, w in zip(values, widths, strict=True)).rstrip()

    out = [line(_COLUMNS), line(["-" * w for w in widths])]
    out += [line(c) + ("   <<<" if c[-1] == "FAIL" else "") for c in cells]
    out.append("")
    out.append("baselines and notes:")
    for row in rows:
        text = f"  {row.scenario}: {row.measure}: baseline = {row.baseline_name}"
        out.append(text + (f"; {row.note}" if row.note else ""))
    return "\n".join(out)


def to_json(rows: Sequence[Row], meta: dict[str, Any]) -> dict[str, Any]:
    return {
        "meta": meta,
        "rows": [{**asdict(row), "verdict": row.verdict} for row in rows],
    }


# -- chart ----------------------------------------------------------------------------

_COLOURS = {"PASS": "#2e7d32", "FAIL": "#c62828", "info": "#757575"}


def draw_chart(rows: Sequence[Row], path: Path, title: str) -> str | None:
    """Ratios against their targets as a PNG; a note instead if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install -e '.[bench]'): no chart drawn"
    # Ratios only: an absolute target's limit is not on the ratio axis.
    shown = [
        row
        for row in rows
        if row.ratio is not None
        and row.ratio.median > 0
        and not (row.target is not None and row.target.absolute)
    ]
    if not shown:
        return "no ratios to chart"
    fig, ax = plt.subplots(figsize=(10, 0.5 * len(shown) + 1.6))
    labels = [f"{row.scenario}: {row.measure}" for row in reversed(shown)]
    for y, row in enumerate(reversed(shown)):
        assert row.ratio is not None
        r = row.ratio
        ax.barh(
            y,
            r.median,
            color=_COLOURS[row.verdict],
            alpha=0.85,
            xerr=[[r.median - r.q1], [r.q3 - r.median]],
            capsize=3,
        )
        if row.target is not None:
            ax.plot([row.target.limit] * 2, [y - 0.4, y + 0.4], color="black", linewidth=2)
        ax.text(
            r.q3 * 1.08,
            y,
            f"{r.median:.3g}x ({row.target.text if row.target else 'info'})",
            va="center",
            fontsize=8,
        )
    ax.set_yticks(range(len(shown)), labels, fontsize=8)
    ax.set_xscale("log")
    ax.set_xlim(_x_limits(shown))
    ax.set_xlabel(
        "sessionstore / baseline (time; rows in ops/s: throughput)\n"
        "bar = median, whisker = IQR, black tick = target"
    )
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


def _x_limits(rows: Sequence[Row]) -> tuple[float, float]:
    values: list[float] = []
    for row in rows:
        assert row.ratio is not None
        values += [row.ratio.q1, row.ratio.q3 * 3]
        if row.target is not None:
            values.append(row.target.limit)
    low = min(v for v in values if v > 0)
    return 10 ** math.floor(math.log10(low) - 0.1), max(values) * 1.5

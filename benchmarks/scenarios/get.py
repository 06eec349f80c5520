"""get: O(1) reads, a 2 MB document against a 2 KB one (no database baseline)."""

from __future__ import annotations

from typing import Any

from ..context import Bench
from ..documents import player_profile
from ..results import Row, Target, compare
from ..timing import Case


def run(bench: Bench) -> list[Row]:
    small, large = player_profile(2048), player_profile(2 * 1024 * 1024)
    store = bench.store(small)
    store.load("small")
    store.load("large")

    def replace(_: Any) -> Any:
        return large

    store.update_immutable("large", replace)
    store.get("small"), store.get("large")  # the first get after a change builds the view
    inner = bench.sizes.inner(50_000)
    row = compare(
        "get",
        "2 MB vs 2 KB doc",
        Case("2 MB", lambda: store.get("large"), inner=inner),
        Case("2 KB", lambda: store.get("small"), inner=inner),
        repeats=bench.sizes.repeats,
        baseline_name="sessionstore get of a 2 KB document (same store, same run)",
        target=Target("<=", 1.5, "≤ 1.5x"),
        note="steady state; the first get after a change builds the frozen view once (O(size))",
    )
    store.unload("small")
    store.unload("large")
    return [row]

"""update of a ~2 KB document in memory, against (b) a SELECT .. FOR UPDATE transaction."""

from __future__ import annotations

from typing import Any

from ..context import Bench
from ..documents import bump, player_profile
from ..results import Row, Target, compare
from ..timing import Case
from ._raw import orm_change


def _bump_all(found: dict[str, Any]) -> None:
    for document in found.values():
        bump(document)


def run(bench: Bench) -> list[Row]:
    document = player_profile(2048)
    store = bench.store(document)
    store.load("u1")
    bench.put_docs({"u1": document})
    row = compare(
        "update",
        "2 KB doc, throughput",
        Case("sessionstore", lambda: store.update("u1", bump), inner=bench.sizes.inner(5_000)),
        Case("orm", orm_change(bench, ["u1"], _bump_all), inner=bench.sizes.inner(200)),
        repeats=bench.sizes.repeats,
        baseline_name="(b) SQLAlchemy Core engine.begin(): SELECT doc FOR UPDATE, "
        "change in Python, UPDATE, COMMIT",
        target=Target(">=", 50.0, "≥ 50x"),
        throughput=True,
        note="update is in memory (durable at the next save); the baseline commits each change",
    )
    store.unload("u1")
    return [row]

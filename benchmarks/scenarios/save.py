"""save: write a dirty ~2 KB document, against (a) one prepared autocommit upsert (bytea)."""

from __future__ import annotations

from ..context import Bench
from ..documents import bump, player_profile
from ..results import Row, Target, compare
from ..timing import Case
from ._raw import RAW_UPSERT, raw_dirty_upsert_case


def run(bench: Bench) -> list[Row]:
    document = player_profile(2048)
    store = bench.store(document)
    store.load("p1")
    with bench.raw(autocommit=True) as conn:
        inner = bench.sizes.inner(200)
        row = compare(
            "save",
            "dirty 2 KB doc",
            Case(
                "sessionstore",
                lambda: store.save("p1"),
                prepare=lambda: store.update("p1", bump),
                inner=inner,
            ),
            raw_dirty_upsert_case(bench, conn, "p1", document, inner),
            repeats=bench.sizes.repeats,
            baseline_name=f"{RAW_UPSERT} (INSERT .. ON CONFLICT DO UPDATE, the JSON as %b)",
            target=Target("<=", 1.2, "≤ 1.2x"),
        )
    store.unload("p1")
    return [row]

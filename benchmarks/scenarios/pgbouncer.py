"""pgbouncer: what ``prepared_statements=False`` costs a save, on plain PostgreSQL.

Behind PgBouncer in transaction mode before 1.21, psycopg must prepare
nothing (docs/scaling.md#pgbouncer). The save of a dirty 2 KB document is
the statement that gains most from preparing: the fenced write is one
large statement, parsed and planned on every run without it. Two Stores on
the same server in the same run, one with prepared statements off, one with
them on (the default), timed interleaved; no PgBouncer in between, so the
figure is the cost of the option alone, not of the extra hop.
"""

from __future__ import annotations

import sessionstore as ss

from ..context import Bench
from ..documents import bump, player_profile
from ..results import Row, Target, compare
from ..timing import Case


def run(bench: Bench) -> list[Row]:
    document = player_profile(2048)
    off = bench.store(document, prepared_statements=False)
    on = bench.store(document)
    for store in (off, on):
        store.load("p1")
    inner = bench.sizes.inner(200)

    def save_case(label: str, store: ss.Store) -> Case:
        return Case(
            label, lambda: store.save("p1"), prepare=lambda: store.update("p1", bump), inner=inner
        )

    row = compare(
        "pgbouncer",
        "save: dirty 2 KB doc, prepared statements off",
        save_case("sessionstore", off),
        save_case("prepared", on),
        repeats=bench.sizes.repeats,
        baseline_name="the same save with prepared statements on (the default), same server",
        target=Target("<=", 1.3, "≤ 1.3x"),
        note="both Stores on plain PostgreSQL: the cost of the option, without PgBouncer's hop",
    )
    for store in (off, on):
        store.unload("p1")
    return [row]

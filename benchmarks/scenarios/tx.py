"""2-key tx transfer, against (a) a raw transaction of two JSONB row updates (and (b), info)."""

from __future__ import annotations

from typing import Any

from ..context import Bench
from ..documents import player_profile, transfer
from ..results import Row, Target, compare
from ..timing import Case
from ._raw import orm_change


def _pay(documents: dict[str, Any]) -> bool:
    return transfer(documents, "t1", "t2")


def run(bench: Bench) -> list[Row]:
    document = player_profile(2048)
    store = bench.store(document)
    for key in ("t1", "t2"):
        store.load(key)
    bench.put_docs({"t1": document, "t2": document})
    move = (
        f"UPDATE {bench.table('docs')} SET doc = jsonb_set(doc, '{{coins}}', "
        "to_jsonb((doc->>'coins')::bigint + %s)) WHERE key = %s"
    )
    inner = bench.sizes.inner(100)
    ours = Case("sessionstore", lambda: store.tx(["t1", "t2"], _pay), inner=inner)
    with bench.raw() as conn:

        def raw_transfer() -> None:
            conn.execute(move, (-5, "t1"), prepare=True)
            conn.execute(move, (5, "t2"), prepare=True)
            conn.commit()

        rows = [
            compare(
                "tx",
                "2-key transfer",
                ours,
                Case("raw", raw_transfer, inner=inner),
                repeats=bench.sizes.repeats,
                baseline_name="(a) psycopg BEGIN; 2 x UPDATE docs SET doc = jsonb_set(..coins..); "
                "COMMIT",
                target=Target("<=", 2.0, "≤ 2x"),
            ),
            compare(
                "tx",
                "2-key transfer vs (b)",
                ours,
                Case("orm", orm_change(bench, ["t1", "t2"], _pay), inner=inner),
                repeats=bench.sizes.repeats,
                baseline_name="(b) SQLAlchemy engine.begin(): SELECT both FOR UPDATE, change, "
                "2 x UPDATE, COMMIT",
                target=None,
            ),
        ]
    for key in ("t1", "t2"):
        store.unload(key)
    return rows

"""Heartbeat: renew every lease of a Store holding many keys, against (a) one raw UPDATE."""

from __future__ import annotations

from sessionstore import db
from sessionstore._storage import leases

from ..context import Bench
from ..results import Figure, Row, Target, compare
from ..timing import Case


def run(bench: Bench) -> list[Row]:
    store = bench.many_store()
    many = bench.sizes.many
    engine = db.create_engine(bench.dsn, pool_size=1).execution_options(
        isolation_level="AUTOCOMMIT"
    )
    renews = [0]
    raw_sql = (
        f"UPDATE {bench.table('locks')} SET expires_at = clock_timestamp() "
        "+ make_interval(secs => %s) WHERE store = %s AND holder = %s::uuid"
    )
    try:
        with engine.connect() as conn, bench.raw(autocommit=True) as raw:

            def renew() -> None:
                # What the heartbeat sends: the (key, token) of every session it holds.
                held = [(entry.key, token) for entry, token in store._core.table.leases()]
                renewed = leases.renew(
                    conn, bench.schema, store.name, store.holder, 3600.0, held, wait=5.0
                )
                renews[0] += 1
                if len(renewed) != many:
                    raise AssertionError(f"renewed {len(renewed)} of {many} leases")

            def raw_update() -> None:
                cursor = raw.execute(raw_sql, (3600.0, store.name, store.holder), prepare=True)
                if cursor.rowcount != many:
                    raise AssertionError(f"raw UPDATE touched {cursor.rowcount} of {many} rows")

            row = compare(
                "heartbeat",
                f"renew {many:,} leases",
                Case("sessionstore", renew, inner=3),
                Case("raw", raw_update, inner=3),
                repeats=bench.sizes.repeats,
                baseline_name=f"(a) psycopg UPDATE locks SET expires_at = .. of the same {many:,} "
                "rows (autocommit)",
                target=Target("<=", 2.0, "≤ 2x"),
                note="times sessionstore._storage.leases.renew() (returns {key: token}) "
                "on an autocommit connection",
            )
            # Count the statements on the server: every renew is one autocommit
            # write, which takes exactly one transaction id; nothing else writes
            # meanwhile (the stores' timers are far longer than the run).
            xmax = "SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint"
            before_renews = renews[0]
            first = int(raw.execute(xmax).fetchall()[0][0])
            for _ in range(10):
                renew()
            assigned = int(raw.execute(xmax).fetchall()[0][0]) - first
            counted = renews[0] - before_renews
    finally:
        engine.dispose()
    per_renew = assigned / counted
    return [
        row,
        Row(
            "heartbeat",
            "statements per renew",
            Figure.exact(per_renew, "stmts"),
            baseline_name="counted on the server (transaction ids taken by 10 renewals)",
            ratio=Figure.exact(per_renew, "x"),
            target=Target("<=", 1.0, "= 1"),
            note=f"{assigned} write transactions in {counted} renewals",
            # Exactly one: zero would mean the count missed the renewals.
            passed=per_renew == 1.0,
        ),
    ]

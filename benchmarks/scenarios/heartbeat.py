"""Heartbeat: renew every lease of a Store holding many keys, against (a) one raw UPDATE."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import psycopg
import sqlalchemy as sa

import sessionstore as ss
from sessionstore import db
from sessionstore._storage import leases

from ..context import Bench
from ..results import Figure, Row, Target, compare
from ..timing import Case

__all__ = ["autocommit_engine", "renew_row"]


def autocommit_engine(bench: Bench) -> sa.Engine:
    """An engine of one autocommit connection, as the heartbeat's (the caller disposes it)."""
    return db.create_engine(bench.dsn, pool_size=1).execution_options(isolation_level="AUTOCOMMIT")


def _renewer(
    bench: Bench, store: ss.Store, conn: sa.Connection, renews: list[int]
) -> Callable[[], None]:
    """One renew of every lease ``store`` holds, as the heartbeat sends it; counted in
    ``renews``, the count of renewed leases asserted."""
    core = store._core
    assert core is not None, "the store is open"
    many = len(core.table)

    def renew() -> None:
        # What the heartbeat sends: the (key, token) of every session it holds.
        held = [(entry.key, token) for entry, token in core.table.leases()]
        renewed = leases.renew(conn, bench.schema, store.name, store.holder, 3600.0, held, wait=5.0)
        renews[0] += 1
        if len(renewed) != many:
            raise AssertionError(f"renewed {len(renewed)} of {many} leases")

    return renew


def _raw_updater(
    bench: Bench, store: ss.Store, raw: psycopg.Connection[Any], many: int
) -> Callable[[], None]:
    """(a) one prepared ``UPDATE locks SET expires_at`` of the same rows."""
    raw_sql = (
        f"UPDATE {bench.table('locks')} SET expires_at = clock_timestamp() "
        "+ make_interval(secs => %s) WHERE store = %s AND holder = %s::uuid"
    )

    def raw_update() -> None:
        cursor = raw.execute(raw_sql, (3600.0, store.name, store.holder), prepare=True)
        if cursor.rowcount != many:
            raise AssertionError(f"raw UPDATE touched {cursor.rowcount} of {many} rows")

    return raw_update


def renew_row(
    bench: Bench,
    store: ss.Store,
    conn: sa.Connection,
    raw: psycopg.Connection[Any],
    *,
    scenario: str = "heartbeat",
    inner: int = 3,
    repeats: int | None = None,
) -> Row:
    """One renew of all of ``store``'s leases against (a) one raw UPDATE of the same rows."""
    core = store._core
    assert core is not None, "the store is open"
    many = len(core.table)
    return compare(
        scenario,
        f"renew {many:,} leases",
        Case("sessionstore", _renewer(bench, store, conn, [0]), inner=inner),
        Case("raw", _raw_updater(bench, store, raw, many), inner=inner),
        repeats=repeats or bench.sizes.repeats,
        baseline_name=f"(a) psycopg UPDATE locks SET expires_at = .. of the same {many:,} "
        "rows (autocommit)",
        target=Target("<=", 2.0, "≤ 2x"),
        note="times sessionstore._storage.leases.renew() (returns {key: token}) "
        "on an autocommit connection",
    )


def _statements_row(
    bench: Bench, store: ss.Store, conn: sa.Connection, raw: psycopg.Connection[Any]
) -> Row:
    """Write transactions per renew, counted on the server."""
    renews = [0]
    renew = _renewer(bench, store, conn, renews)
    # Every renew is one autocommit write, which takes exactly one transaction
    # id; nothing else writes meanwhile (the stores' timers outlast the run).
    xmax = "SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint"
    first = int(raw.execute(xmax).fetchall()[0][0])
    for _ in range(10):
        renew()
    assigned = int(raw.execute(xmax).fetchall()[0][0]) - first
    per_renew = assigned / renews[0]
    return Row(
        "heartbeat",
        "statements per renew",
        Figure.exact(per_renew, "stmts"),
        baseline_name="counted on the server (transaction ids taken by 10 renewals)",
        ratio=Figure.exact(per_renew, "x"),
        target=Target("<=", 1.0, "= 1"),
        note=f"{assigned} write transactions in {renews[0]} renewals",
        # Exactly one: zero would mean the count missed the renewals.
        passed=per_renew == 1.0,
    )


def run(bench: Bench) -> list[Row]:
    store = bench.many_store()
    engine = autocommit_engine(bench)
    try:
        with engine.connect() as conn, bench.raw(autocommit=True) as raw:
            return [renew_row(bench, store, conn, raw), _statements_row(bench, store, conn, raw)]
    finally:
        engine.dispose()

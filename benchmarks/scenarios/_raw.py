"""Baseline statements shared by scenarios: raw psycopg (a) and SQLAlchemy Core (b)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import orjson
import psycopg
import sqlalchemy as sa

from ..context import Bench
from ..documents import bump
from ..timing import Case

__all__ = [
    "RAW_UPSERT",
    "chunks",
    "orm_change",
    "raw_dirty_upsert_case",
    "raw_table",
    "raw_upsert",
]

T = TypeVar("T")


def raw_upsert(bench: Bench, conn: psycopg.Connection[Any]) -> Callable[[str, bytes], None]:
    """(a) the true minimum of a single-key write: one prepared upsert, autocommit.

    ``conn`` must be autocommit (``bench.raw(autocommit=True)``): the statement
    is its own transaction, one round trip, no BEGIN/COMMIT. The pre-serialised
    JSON bytes go in binary (``%b``) into the ``bytea`` column of ``docs_bytea``,
    so the server neither parses nor validates them (sessionstore stores bytes too).
    """
    if not conn.autocommit:
        raise ValueError("raw_upsert needs an autocommit connection")
    sql = (
        f"INSERT INTO {bench.table('docs_bytea')} (key, doc) VALUES (%s, %b) "
        "ON CONFLICT (key) DO UPDATE SET doc = excluded.doc"
    )

    def upsert(key: str, document: bytes) -> None:
        conn.execute(sql, (key, document), prepare=True)

    return upsert


def raw_dirty_upsert_case(
    bench: Bench, conn: psycopg.Connection[Any], key: str, document: Any, inner: int
) -> Case:
    """(a) as a Case: ``bump`` the document and serialise it untimed, then upsert it.

    The baseline of a single-key write (``save``, a durable update): the same
    change, its JSON made outside the timed region, written by :func:`raw_upsert`
    (autocommit, prepared, binary bytea).
    """
    upsert = raw_upsert(bench, conn)
    pending = [orjson.dumps(document)]

    def dirty_raw() -> None:
        bump(document)
        pending[0] = orjson.dumps(document)

    return Case("raw", lambda: upsert(key, pending[0]), prepare=dirty_raw, inner=inner)


RAW_UPSERT = "(a) psycopg autocommit prepared upsert of the bytea row"
"""The name of :func:`raw_upsert` in a row's baseline."""


def orm_change(
    bench: Bench,
    keys: list[str],
    change: Callable[[dict[str, Any]], object],
    engine: sa.Engine | None = None,
) -> Callable[[], None]:
    """(b) read the rows ``FOR UPDATE``, change them in Python, write them back, commit.

    On ``bench.engine`` unless ``engine`` is given (one whose pool fits more threads).
    """
    docs = bench.docs
    pool = engine or bench.engine
    select = (
        sa.select(docs.c.key, docs.c.doc)
        .where(docs.c.key.in_(sorted(keys)))
        .order_by(docs.c.key)
        .with_for_update()
    )

    def transaction() -> None:
        with pool.begin() as conn:
            found = {row.key: row.doc for row in conn.execute(select)}
            change(found)
            for key, document in found.items():
                conn.execute(sa.update(docs).where(docs.c.key == key).values(doc=document))

    return transaction


def chunks(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    """``items`` in slices of ``size`` (the library's ``save_batch_size``, 500)."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


def raw_table(bench: Bench, name: str, rows: Sequence[tuple[str, str]] = ()) -> str:
    """(a) a table ``name (key text primary key, doc jsonb)`` of the bench schema; its name.

    Filled with ``rows`` (key, pre-serialised document) by one COPY, then analysed,
    so a baseline's plans see its real size.
    """
    table = bench.table(name)
    with bench.raw() as conn:
        conn.execute(f"CREATE TABLE {table} (key text PRIMARY KEY, doc jsonb NOT NULL)")
        with conn.cursor().copy(f"COPY {table} (key, doc) FROM STDIN") as copy:
            for row in rows:
                copy.write_row(row)
        conn.commit()
        conn.execute(f"ANALYZE {table}")
        conn.commit()
    return table

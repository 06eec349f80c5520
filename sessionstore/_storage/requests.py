"""Applied requests: reading the ``applied_requests`` table (docs/idempotency.md).

Owns the one statement that asks whether a key applied an idempotency key,
for keys this process does not hold. The ids are written, and pruned to the
newest ``idempotency_retention`` per key, by the fenced write itself
(:mod:`.files`), atomically with the version carrying their effect; a load
reads them with the version (:func:`.files.read_for_load`).
"""

from __future__ import annotations

import functools

import sqlalchemy as sa

__all__ = ["applied"]


@functools.cache
def _applied(schema: str) -> sa.TextClause:
    return sa.text(
        f'SELECT EXISTS (SELECT 1 FROM "{schema}".applied_requests '
        "WHERE store = :store AND key = :key AND request_id = :request_id)"
    )


def applied(conn: sa.Connection, schema: str, store: str, key: str, request_id: str) -> bool:
    """Has ``key`` a saved version that applied ``request_id`` (within the retention)?"""
    statement = _applied(schema)
    params = {"store": store, "key": key, "request_id": request_id}
    return bool(conn.execute(statement, params).scalar())

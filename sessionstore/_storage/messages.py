"""Messages: the ``messages`` table (docs/messages.md).

Owns the statements that send a message to a key, read the messages waiting
for a key, and find which of a holder's keys have some. A send is durable
when it returns, bounded per key (``max_pending_messages``, counted under a
transaction-level advisory lock on the key so that concurrent senders
cannot overshoot), and wakes the key's live holder with a NOTIFY on its
message channel (:func:`.sql.message_channel`), sent at commit. Messages are
deleted only by the fenced write that carries their effect
(:mod:`.files`), or with the key (``erase``).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import sqlalchemy as sa

from ..frozen import decode
from .types import Message

__all__ = ["pending", "send", "waiting"]


class _Statements:
    def __init__(self, schema: str) -> None:
        s = f'"{schema}"'
        # One call (alembic revision 0004): the per-key advisory lock, the
        # room counted up to :max only (an index range, never the whole
        # queue), the insert, and the NOTIFY to the key's live holder. A
        # retry of this very send (same nonce) finds its row.
        self.send = sa.text(
            f"SELECT {s}.message_send(:store, :key, CAST(:body AS jsonb), "
            "CAST(:nonce AS uuid), :max)"
        )
        self.pending = sa.text(
            f"SELECT id, CAST(body AS text) AS body FROM {s}.messages "
            "WHERE store = :store AND key = :key AND id > :after ORDER BY id LIMIT :limit"
        )
        self.waiting = sa.text(
            f"SELECT DISTINCT key FROM {s}.messages "
            "WHERE store = :store AND key = ANY(CAST(:keys AS text[]))"
        )


@functools.cache
def _sql(schema: str) -> _Statements:
    return _Statements(schema)


def send(
    conn: sa.Connection,
    schema: str,
    store: str,
    key: str,
    body: str,
    max_pending: int,
    nonce: str,
) -> int | None:
    """Store a message (JSON text) for ``key``; its id, or None if the key's queue is full.

    ``nonce`` identifies this send across retries: an attempt whose commit
    was not acknowledged is found, not stored again.
    """
    sql = _sql(schema)
    params = {"store": store, "key": key, "body": body, "max": max_pending, "nonce": nonce}
    found = conn.execute(sql.send, params).scalar()
    return None if found is None else int(found)


def pending(
    conn: sa.Connection, schema: str, store: str, key: str, after: int, limit: int
) -> list[Message]:
    """Messages waiting for ``key`` with ids above ``after``, in send order."""
    params = {"store": store, "key": key, "after": after, "limit": limit}
    rows = conn.execute(_sql(schema).pending, params)
    return [Message(int(row.id), decode(row.body.encode(), "message")) for row in rows]


def waiting(conn: sa.Connection, schema: str, store: str, keys: Sequence[str]) -> set[str]:
    """Which of ``keys`` have messages waiting."""
    rows = conn.execute(_sql(schema).waiting, {"store": store, "keys": list(keys)})
    return {row.key for row in rows}

"""The operator's statements: listing leases, counting keys, the audited steal, the audit log.

Owns the SQL behind :mod:`sessionstore._admin` (the ``sessionstore`` command
line) that no Store needs: the ``locks`` table read a page at a time with
each holder's liveness and each key's last save, the count of a store's
keys, :func:`unlock` (a lease taken from its holder and logged, in one
call of the ``unlock_key`` server function) and the ``audit`` table
(revision 0003). Pages are keyset pages (``key > after``, ``id >
after``): memory stays bounded and no cursor is held open between them.
Identifiers spliced into SQL are validated schema names; every value is a
bound parameter.

How :func:`unlock` fences the holder: the lease row gets a token from the
``lease_tokens`` sequence, an ``expires_at`` of now and a holder id of its
own. The old holder's next fenced write matches its (key, token) no more
(``LockLostError``), its heartbeat finds the lease gone (``on_lock_lost``),
and a loader takes the expired row at once (``leases.acquire`` takes any
row whose ``expires_at`` has passed). The release is announced on the
store's free channel, which wakes loaders waiting for the key.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from .sql import free_channel

__all__ = [
    "AuditRow",
    "LockRow",
    "Unlocked",
    "audit_page",
    "count_keys",
    "locks_page",
    "unlock",
]


@dataclass(frozen=True)
class LockRow:
    """A key's lease row as ``sessionstore locks`` shows it."""

    key: str
    holder: str
    token: int
    host: str
    pid: int
    acquired_at: datetime
    expires_at: datetime
    active: bool
    """Not expired on the database clock."""
    liveness: bool
    """The holder keeps an advisory lock while alive."""
    alive: bool
    """That advisory lock is held right now."""
    last_save: datetime | None
    """When the key's newest version was written (None: never saved)."""


@dataclass(frozen=True)
class Unlocked:
    """What :func:`unlock` did: the lease it took from its holder, and the audit row."""

    key: str
    old_holder: str
    old_token: int
    old_host: str
    old_pid: int
    was_active: bool
    """The lease had not expired yet."""
    was_alive: bool
    """Its holder held its advisory lock (it was running)."""
    new_token: int
    audit_id: int
    at: datetime


@dataclass(frozen=True)
class AuditRow:
    """One row of the ``audit`` table."""

    id: int
    key: str
    action: str
    reason: str
    old_holder: str | None
    old_token: int | None
    old_host: str | None
    old_pid: int | None
    new_token: int | None
    actor: str
    at: datetime


class _Statements:
    """The SQL of this module for one (validated) schema name."""

    def __init__(self, schema: str) -> None:
        s = f'"{schema}"'
        self.count_keys = sa.text(
            f"SELECT count(*) FROM {s}.records WHERE store = :store "
            "AND (CAST(:prefix AS text) IS NULL OR starts_with(key, :prefix))"
        )
        self.locks_page = sa.text(_locks(s, "l.key > :after ORDER BY l.key LIMIT :limit"))
        self.lock_one = sa.text(_locks(s, "l.key = :key"))
        self._unlocking(s)
        audit = (
            "SELECT id, key, action, reason, CAST(old_holder AS text) AS old_holder, old_token, "
            f"old_host, old_pid, new_token, actor, at FROM {s}.audit WHERE store = :store"
        )
        self.audit_page = sa.text(f"{audit} AND id > :after ORDER BY id LIMIT :limit")
        self.audit_key_page = sa.text(
            f"{audit} AND key = :key AND id > :after ORDER BY id LIMIT :limit"
        )

    def _unlocking(self, s: str) -> None:
        # One call (alembic revision 0004): the lease row locked (waiting at
        # most :lock_timeout for a save in flight), what it said of its
        # holder (liveness read before the row changes), the steal, the
        # audit row and the announcement, in one transaction.
        self.unlock = sa.text(
            f"SELECT * FROM {s}.unlock_key(:store, :key, :reason, :actor, "
            "CAST(:holder AS uuid), :host, :pid, :lock_timeout, :channel)"
        )
        self.alive = sa.text(
            f"SELECT h AS holder, {s}.holder_alive(h) AS alive "
            "FROM unnest(CAST(:holders AS uuid[])) AS h"
        )


def _locks(s: str, which: str) -> str:
    """Lease rows with each key's last save; ``which`` picks the rows.

    The holders' liveness is read apart (:data:`_Statements.alive`): it is
    ``pg_locks`` of the server the control connections use (Citus'
    coordinator), once per distinct holder of the page.
    """
    return f"""
SELECT l.key, CAST(l.holder AS text) AS holder, l.token, l.host, l.pid, l.acquired_at,
       l.expires_at, l.expires_at > clock_timestamp() AS active, l.liveness,
       (SELECT max(v.created_at) FROM {s}.versions v
        WHERE v.store = l.store AND v.key = l.key) AS last_save
FROM {s}.locks l
WHERE l.store = :store AND {which}
"""


@functools.cache
def statements(schema: str) -> _Statements:
    """The statements for one schema, built once."""
    return _Statements(schema)


def count_keys(conn: sa.Connection, schema: str, store: str, prefix: str | None) -> int:
    """How many saved keys the store has (starting with ``prefix``, if given)."""
    found = conn.execute(statements(schema).count_keys, {"store": store, "prefix": prefix})
    return int(found.scalar_one())


def _lock_row(row: Any, alive: dict[str, bool]) -> LockRow:
    m = row._mapping
    return LockRow(
        key=m["key"],
        holder=m["holder"],
        token=m["token"],
        host=m["host"],
        pid=m["pid"],
        acquired_at=m["acquired_at"],
        expires_at=m["expires_at"],
        active=bool(m["active"]),
        liveness=bool(m["liveness"]),
        alive=alive.get(m["holder"], False),
        last_save=m["last_save"],
    )


def locks_page(
    conn: sa.Connection, schema: str, store: str, *, key: str | None, after: str, limit: int
) -> list[LockRow]:
    """Up to ``limit`` lease rows after ``after`` in key order; or ``key``'s alone."""
    sql = statements(schema)
    if key is not None:
        rows = list(conn.execute(sql.lock_one, {"store": store, "key": key}))
    else:
        page = {"store": store, "after": after, "limit": limit}
        rows = list(conn.execute(sql.locks_page, page))
    holders = sorted({row.holder for row in rows})
    alive = {
        str(found.holder): bool(found.alive)
        for found in conn.execute(sql.alive, {"holders": holders})
    }
    return [_lock_row(row, alive) for row in rows]


def unlock(
    conn: sa.Connection,
    schema: str,
    store: str,
    key: str,
    *,
    reason: str,
    actor: str,
    holder: str,
    host: str,
    pid: int,
    lock_wait: float,
) -> Unlocked | None:
    """Take ``key``'s lease from whoever holds it and log it; None if nobody does.

    One transaction: lock the lease row (waiting at most ``lock_wait``
    seconds for a save in flight), give it a new token, expired at once,
    under ``holder`` (an id of the caller's that nobody renews), insert the
    audit row, announce the key free, commit. See the module docstring for
    why this fences the old holder.
    """
    params = {
        "store": store,
        "key": key,
        "reason": reason,
        "actor": actor,
        "holder": holder,
        "host": host,
        "pid": pid,
        "lock_timeout": f"{max(1, int(lock_wait * 1000))}ms",
        "channel": free_channel(schema, store),
    }
    with conn.begin():
        done = conn.execute(statements(schema).unlock, params).first()
    if done is None:
        return None
    return Unlocked(
        key=key,
        old_holder=done.old_holder,
        old_token=done.old_token,
        old_host=done.old_host,
        old_pid=done.old_pid,
        was_active=bool(done.was_active),
        was_alive=bool(done.was_alive),
        new_token=done.new_token,
        audit_id=done.audit_id,
        at=done.at,
    )


def audit_page(
    conn: sa.Connection, schema: str, store: str, *, key: str | None, after: int, limit: int
) -> list[AuditRow]:
    """Up to ``limit`` audit rows of the store (or of ``key``) after id ``after``, oldest first."""
    sql = statements(schema)
    params: dict[str, object] = {"store": store, "after": after, "limit": limit}
    if key is not None:
        rows = conn.execute(sql.audit_key_page, {**params, "key": key})
    else:
        rows = conn.execute(sql.audit_page, params)
    return [AuditRow(**row._asdict()) for row in rows]

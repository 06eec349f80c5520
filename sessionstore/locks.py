"""Locks: the lease rows that give one holder exclusive use of a key.

Owns the ``locks`` table and the statements on it. A lease row carries the
holder id, a fencing token drawn from a global sequence (so it only ever
grows, for every key, even across release and erase), and ``expires_at`` on
the database clock (``clock_timestamp()``: ``now()`` is frozen at the start
of a transaction). Statements that lock several lease rows lock them in key
order so they can never deadlock each other. The fence itself, the check
that makes a write conditional on the lease, is part of the write in
:mod:`sessionstore.files`.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa

from .control import ALIVE_SQL, channel_for
from .db import driver_cursor

__all__ = [
    "LeaseInfo",
    "LeaseStatements",
    "acquire",
    "info",
    "lease_statements",
    "release",
    "renew",
    "request_handoff",
]


@dataclass(frozen=True)
class LeaseInfo:
    """Who holds a key, as stored in its lease row."""

    holder: str
    token: int
    expires_at: datetime
    active: bool
    host: str
    pid: int
    liveness: bool
    """The holder keeps an advisory lock while alive (instant takeover applies)."""
    alive: bool
    """The holder's advisory lock is held right now."""


# Statements on many lease rows find them with one filtered scan that locks
# them in key order, then change them by ctid (rows locked in the same
# statement keep their ctid). No join: with stale statistics (a table that
# just grew by thousands of leases) the planner estimates one row and turns a
# join into nested loops, seconds for 10,000 leases (measured). The pairs are
# two = ANY filters: tokens are unique across all leases, so matching keys and
# tokens separately matches exactly the pairs.
_MATCH = "key = ANY(CAST(%(keys)s AS text[])) AND token = ANY(CAST(%(tokens)s AS bigint[]))"


class LeaseStatements:
    """The lease SQL of one (validated) schema name."""

    def __init__(self, schema: str) -> None:
        s = f'"{schema}"'
        # Take the row if it is free (no row), expired, already ours (a
        # session we closed locally after losing track of it), or held by a
        # holder the caller saw dead (advisory lock gone) for the whole grace
        # and that is still dead now, at the same token. The new token fences
        # whatever the previous owner still has in flight.
        self.acquire = sa.text(f"""
INSERT INTO {s}.locks AS l (store, key, holder, token, acquired_at, expires_at, host, pid,
                            liveness)
VALUES (:store, :key, :holder, nextval('{s}.lease_tokens'), clock_timestamp(),
        clock_timestamp() + make_interval(secs => :duration), :host, :pid, :liveness)
ON CONFLICT (store, key) DO UPDATE
    SET holder = excluded.holder, token = excluded.token, acquired_at = excluded.acquired_at,
        expires_at = excluded.expires_at, host = excluded.host, pid = excluded.pid,
        liveness = excluded.liveness
    WHERE l.expires_at <= clock_timestamp() OR l.holder = excluded.holder
       OR (l.holder = CAST(:dead_holder AS uuid) AND l.token = :dead_token AND l.liveness
           AND NOT {ALIVE_SQL.format(holder="l.holder")})
RETURNING token
""")
        # Renew exactly the leases the holder still uses: a lease it no longer
        # tracks (a release that failed) is left to expire.
        # Renew exactly the leases the holder still uses: a lease it no longer
        # tracks (a release that failed) is left to expire.
        self.renew = f"""
UPDATE {s}.locks SET expires_at = clock_timestamp() + make_interval(secs => %(duration)s)
WHERE ctid = ANY(ARRAY(
    SELECT ctid FROM {s}.locks
    WHERE store = %(store)s AND holder = %(holder)s AND {_MATCH}
      AND expires_at > clock_timestamp()
    ORDER BY key
    FOR UPDATE
))
RETURNING key, token
"""
        self.release = f"""
DELETE FROM {s}.locks
WHERE ctid = ANY(ARRAY(
    SELECT ctid FROM {s}.locks
    WHERE store = %(store)s AND holder = %(holder)s AND {_MATCH}
    ORDER BY key
    FOR UPDATE
))
"""
        self.info = sa.text(
            "SELECT holder, token, expires_at, expires_at > clock_timestamp() AS active, "
            f"host, pid, liveness, {ALIVE_SQL.format(holder='holder')} AS alive "
            f"FROM {s}.locks WHERE store = :store AND key = :key"
        )


_cache: dict[str, LeaseStatements] = {}


def lease_statements(schema: str) -> LeaseStatements:
    found = _cache.get(schema)
    if found is None:
        found = _cache[schema] = LeaseStatements(schema)
    return found


HOST = socket.gethostname()


def acquire(
    conn: sa.Connection,
    schema: str,
    store: str,
    key: str,
    holder: str,
    duration: float,
    *,
    liveness: bool,
    dead: LeaseInfo | None = None,
) -> int | None:
    """Take the key's lease if free, expired, or held by ``dead`` (still dead); token or None."""
    params = {
        "store": store,
        "key": key,
        "holder": holder,
        "duration": duration,
        "host": HOST,
        "pid": os.getpid(),
        "liveness": liveness,
        "dead_holder": dead.holder if dead is not None else None,
        "dead_token": dead.token if dead is not None else None,
    }
    token: int | None = conn.execute(lease_statements(schema).acquire, params).scalar()
    return token


def renew(
    conn: sa.Connection,
    schema: str,
    store: str,
    holder: str,
    duration: float,
    leases: Iterable[tuple[str, int]],
) -> dict[str, int]:
    """Extend the given live ``(key, token)`` leases of ``holder`` in one statement.

    Returns what was renewed, ``{key: token}``; a lease missing from it has
    expired or was taken over.
    """
    pairs = sorted(leases)
    params = {
        "store": store,
        "holder": holder,
        "duration": duration,
        "keys": [key for key, _ in pairs],
        "tokens": [token for _, token in pairs],
    }
    with driver_cursor(conn) as cursor:
        rows = cursor.execute(lease_statements(schema).renew, params, prepare=False).fetchall()
    return {row.key: row.token for row in rows}


def release(
    conn: sa.Connection, schema: str, store: str, holder: str, leases: Iterable[tuple[str, int]]
) -> None:
    """Drop the given ``(key, token)`` leases of ``holder`` (ones already lost are skipped)."""
    pairs = sorted(leases)
    if not pairs:
        return
    params = {
        "store": store,
        "holder": holder,
        "keys": [key for key, _ in pairs],
        "tokens": [token for _, token in pairs],
    }
    with driver_cursor(conn) as cursor:
        cursor.execute(lease_statements(schema).release, params, prepare=False)


def info(conn: sa.Connection, schema: str, store: str, key: str) -> LeaseInfo | None:
    """The key's lease row, live or expired, or None if nobody holds it."""
    row = conn.execute(lease_statements(schema).info, {"store": store, "key": key}).first()
    if row is None:
        return None
    return LeaseInfo(
        str(row.holder),
        row.token,
        row.expires_at,
        row.active,
        row.host,
        row.pid,
        row.liveness,
        row.alive,
    )


def holder_alive(conn: sa.Connection, holder: str) -> bool:
    """Does ``holder`` hold its advisory lock, as other connections see it?"""
    return bool(conn.execute(_ALIVE, {"holder": holder}).scalar())


def request_handoff(conn: sa.Connection, holder: str, key: str) -> None:
    """Ask a live holder to save and release ``key`` (it may refuse)."""
    params = {"channel": channel_for(holder), "key": key}
    conn.execute(_NOTIFY, params)


_NOTIFY = sa.text("SELECT pg_notify(:channel, :key)")
_ALIVE = sa.text("SELECT " + ALIVE_SQL.format(holder="CAST(:holder AS uuid)"))

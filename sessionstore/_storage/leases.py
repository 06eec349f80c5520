"""Leases: the lock rows that give one holder exclusive use of a key.

Owns the ``locks`` table's statements. A lease row carries the holder id, a
fencing token drawn from a global sequence (so it only ever grows, for every
key, even across release and erase), and ``expires_at`` on the database
clock (``clock_timestamp()``: ``now()`` is frozen at the start of a
transaction). Rows are found by ``(store, key, token)``, never by a ctid that
a concurrent renewal may have moved. Statements that lock several lease rows
lock them in key order, so they can never deadlock each other; the renewal
skips rows someone else has locked (an operator's ``SELECT ... FOR UPDATE``)
so that such a row puts only its own key at risk. Releases and handovers
announce the key on the store's free channel, which wakes waiting loaders.
The fence itself is part of every write (:mod:`.files`).
"""

from __future__ import annotations

import functools
import os
import socket
from collections.abc import Iterable, Sequence

import sqlalchemy as sa

from ..db import driver_connection, driver_cursor
from .sql import ALIVE_SQL, free_channel, holder_channel
from .types import LeaseInfo, Renewal

__all__ = [
    "HOST",
    "LeaseStatements",
    "acquire",
    "acquire_many",
    "hand_over",
    "holder_alive",
    "info",
    "lease_statements",
    "release",
    "release_unclaimed",
    "renew",
    "request_handoff",
]

HOST = socket.gethostname()

# Statements on many lease rows find them with one filtered scan that locks
# them in key order, then change them by key (the primary key), re-checking
# holder and token. No join: with stale statistics (a table that just grew by
# thousands of leases) the planner estimates one row and turns a join into
# nested loops, seconds for 10,000 leases (measured). The pairs are two = ANY
# filters: tokens are unique across all leases, so matching keys and tokens
# separately matches exactly the pairs.
_MATCH = "key = ANY(CAST(%(keys)s AS text[])) AND token = ANY(CAST(%(tokens)s AS bigint[]))"


class LeaseStatements:
    """The lease SQL of one (validated) schema name."""

    def __init__(self, schema: str) -> None:
        s = f'"{schema}"'
        self._taking(s)
        self._keeping(s)
        self._letting_go(s)

    def _taking(self, s: str) -> None:
        # Take the row if it is free (no row), expired, already ours (a
        # session we closed locally after losing track of it, or a key another
        # holder handed over to us), or held by a holder the caller saw dead
        # (advisory lock gone) for the whole grace and that is still dead now,
        # at the same token. The new token fences whatever the previous owner
        # still has in flight.
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
        # Many free or expired leases at once, taken in key order (offline
        # edits, imports); a key held by anyone else is left out. Ours: a
        # lease this holder no longer tracks (the caller claimed the keys in
        # its registry first, so nothing here uses them).
        self.acquire_many = sa.text(f"""
INSERT INTO {s}.locks AS l (store, key, holder, token, acquired_at, expires_at, host, pid,
                            liveness)
SELECT :store, k.key, :holder, nextval('{s}.lease_tokens'), clock_timestamp(),
       clock_timestamp() + make_interval(secs => :duration), :host, :pid, :liveness
FROM unnest(CAST(:keys AS text[])) AS k(key)
ORDER BY k.key
ON CONFLICT (store, key) DO UPDATE
    SET holder = excluded.holder, token = excluded.token, acquired_at = excluded.acquired_at,
        expires_at = excluded.expires_at, host = excluded.host, pid = excluded.pid,
        liveness = excluded.liveness
    WHERE l.expires_at <= clock_timestamp() OR l.holder = excluded.holder
RETURNING key, token
""")
        self.info = sa.text(
            "SELECT holder, token, expires_at, expires_at > clock_timestamp() AS active, "
            f"host, pid, liveness, {ALIVE_SQL.format(holder='holder')} AS alive "
            f"FROM {s}.locks WHERE store = :store AND key = :key"
        )

    def _keeping(self, s: str) -> None:
        # Renew exactly the leases the holder still uses (a lease it no longer
        # tracks, after a release that failed, is left to expire), skipping
        # rows that someone else holds locked: waiting for one would stall the
        # renewal of every other key. The rows are found by (store, key, token)
        # and locked; the UPDATE then addresses the versions it just locked by
        # ctid (locked, so nobody can move them before it runs). A key filter
        # here instead costs seconds for 10,000 leases when the table's
        # statistics are stale (measured: 2.0 s against 0.23 s). A row moved
        # by a statement that committed after this one's snapshot is missed,
        # never wrongly renewed: renew_all retries it alone.
        mine = (
            f"FROM {s}.locks WHERE store = %(store)s AND holder = %(holder)s "
            f"AND {_MATCH} AND expires_at > clock_timestamp() ORDER BY key"
        )
        self.renew = f"""
UPDATE {s}.locks SET expires_at = clock_timestamp() + make_interval(secs => %(duration)s)
WHERE ctid = ANY(ARRAY(SELECT ctid {mine} FOR UPDATE SKIP LOCKED))
RETURNING key, token
"""
        # Which of the leases the renewal missed are still ours and unexpired
        # (a plain read never waits for a row lock).
        self.still_ours = f"SELECT key {mine}"
        # One missed row, waiting for its lock (bounded by a local lock_timeout).
        self.renew_one = (
            f"UPDATE {s}.locks SET expires_at = clock_timestamp() "
            "+ make_interval(secs => %(duration)s) "
            "WHERE store = %(store)s AND key = %(key)s AND holder = %(holder)s "
            "AND token = %(token)s AND expires_at > clock_timestamp() RETURNING key"
        )

    def _letting_go(self, s: str) -> None:
        # Release the rows found by (store, key, token), locked in key order,
        # addressed by the ctid of the version just locked (fast, see renew).
        # A row that a renewal moved after this statement's snapshot is not
        # deleted by it: release() sees it missing and releases it again.
        # Each released key is announced to waiters.
        self.release = f"""
WITH gone AS (
    DELETE FROM {s}.locks
    WHERE ctid = ANY(ARRAY(
        SELECT ctid FROM {s}.locks
        WHERE store = %(store)s AND holder = %(holder)s AND {_MATCH}
        ORDER BY key FOR UPDATE
    ))
    RETURNING key
)
SELECT key, pg_notify(%(channel)s, key) FROM gone
"""
        # A lease handed to this holder that it never took (pid 0 marks the
        # reservation; taking it sets the taker's pid): let it go.
        self.release_unclaimed = f"""
WITH gone AS (
    DELETE FROM {s}.locks
    WHERE store = %(store)s AND key = %(key)s AND holder = %(holder)s AND pid = 0
    RETURNING key
)
SELECT pg_notify(%(channel)s, key) FROM gone
"""
        # A handoff: the lease passes to the holder that asked for it (with a
        # new token and a short expiry, until that holder takes it properly),
        # so the process that handed it over cannot take it straight back.
        self.hand_over = f"""
WITH moved AS (
    UPDATE {s}.locks
    SET holder = CAST(%(to)s AS uuid), token = nextval('{s}.lease_tokens'),
        expires_at = clock_timestamp() + make_interval(secs => %(reserve)s),
        acquired_at = clock_timestamp(), host = '', pid = 0, liveness = true
    WHERE store = %(store)s AND key = %(key)s AND holder = %(holder)s AND token = %(token)s
    RETURNING key
)
SELECT pg_notify(%(channel)s, key) FROM moved
"""


@functools.cache
def lease_statements(schema: str) -> LeaseStatements:
    """The statements for one schema, built once."""
    return LeaseStatements(schema)


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
    """Take the key's lease if free, expired, ours, or held by ``dead`` (still dead)."""
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


def acquire_many(
    conn: sa.Connection,
    schema: str,
    store: str,
    keys: Sequence[str],
    holder: str,
    duration: float,
    *,
    liveness: bool,
) -> dict[str, int]:
    """Take the leases of ``keys`` that are free or expired; ``{key: token}`` of those taken.

    Never waits for a holder: a key held by anyone (this holder included) is
    left out, for the caller to report.
    """
    params = {
        "store": store,
        "keys": sorted(keys),
        "holder": holder,
        "duration": duration,
        "host": HOST,
        "pid": os.getpid(),
        "liveness": liveness,
    }
    rows = conn.execute(lease_statements(schema).acquire_many, params)
    return {row.key: int(row.token) for row in rows}


def _pairs(store: str, holder: str, leases: Iterable[tuple[str, int]]) -> dict[str, object]:
    pairs = sorted(leases)
    return {
        "store": store,
        "holder": holder,
        "keys": [key for key, _ in pairs],
        "tokens": [token for _, token in pairs],
    }


def renew(
    conn: sa.Connection,
    schema: str,
    store: str,
    holder: str,
    duration: float,
    leases: Iterable[tuple[str, int]],
) -> dict[str, int]:
    """Extend the given live ``(key, token)`` leases of ``holder`` in one statement.

    Returns what was renewed, ``{key: token}``. A lease missing from it has
    expired, was taken over, or is row-locked by someone else right now
    (:func:`renew_all` tells those apart).
    """
    params = {**_pairs(store, holder, leases), "duration": duration}
    with driver_cursor(conn) as cursor:
        rows = cursor.execute(lease_statements(schema).renew, params, prepare=False).fetchall()
    return {row.key: row.token for row in rows}


def renew_all(
    conn: sa.Connection,
    schema: str,
    store: str,
    holder: str,
    duration: float,
    leases: Iterable[tuple[str, int]],
    *,
    wait: float,
) -> Renewal:
    """The heartbeat: renew in one statement, then the rows it had to skip one by one.

    A skipped row that is still ours is renewed alone, waiting at most
    ``wait`` seconds for its lock (a ``SET LOCAL lock_timeout``: nothing is
    left on the connection). One that stays locked is reported ``busy``: at
    risk, but not lost.
    """
    wanted = dict(leases)
    renewed = renew(conn, schema, store, holder, duration, wanted.items())
    missing = [(key, token) for key, token in wanted.items() if renewed.get(key) != token]
    if not missing:
        return Renewal(renewed, frozenset())
    sql = lease_statements(schema)
    with driver_cursor(conn) as cursor:
        ours = cursor.execute(
            sql.still_ours, _pairs(store, holder, missing), prepare=False
        ).fetchall()
    busy: set[str] = set()
    driver = driver_connection(conn)
    for row in ours:
        params = {
            "store": store,
            "holder": holder,
            "key": row.key,
            "token": wanted[row.key],
            "duration": duration,
        }
        try:
            with driver.transaction(), driver.cursor() as cursor:
                timeout = f"{max(1, int(wait * 1000))}ms"
                cursor.execute("SELECT set_config('lock_timeout', %s, true)", (timeout,))
                if cursor.execute(sql.renew_one, params).fetchone() is not None:
                    renewed[row.key] = wanted[row.key]
                    continue
        except Exception as exc:
            if getattr(exc, "sqlstate", None) != "55P03":  # lock_not_available
                raise
        busy.add(row.key)
    return Renewal(renewed, frozenset(busy))


def release(
    conn: sa.Connection, schema: str, store: str, holder: str, leases: Iterable[tuple[str, int]]
) -> None:
    """Drop the given ``(key, token)`` leases of ``holder`` (ones already lost are skipped)."""
    wanted = dict(leases)
    if not wanted:
        return
    channel = free_channel(schema, store)
    params = {**_pairs(store, holder, wanted.items()), "channel": channel}
    sql = lease_statements(schema)
    with driver_cursor(conn) as cursor:
        for _ in range(_RELEASE_ATTEMPTS):
            gone = {row.key for row in cursor.execute(sql.release, params, prepare=False)}
            wanted = {key: token for key, token in wanted.items() if key not in gone}
            if not wanted:
                return
            # Missed: already lost (gone or someone else's), or moved by a
            # renewal that committed after the statement began. Look again.
            ours = cursor.execute(
                sql.still_ours, _pairs(store, holder, wanted.items()), prepare=False
            ).fetchall()
            wanted = {row.key: wanted[row.key] for row in ours}
            if not wanted:
                return
            params = {**_pairs(store, holder, wanted.items()), "channel": channel}


_RELEASE_ATTEMPTS = 3
"""A renewal moves a row at most once per heartbeat: a third miss means a stuck row."""


def hand_over(
    conn: sa.Connection,
    schema: str,
    store: str,
    holder: str,
    key: str,
    token: int,
    to: str,
    reserve: float,
) -> bool:
    """Pass ``key``'s lease to holder ``to`` (it takes it within ``reserve`` s); done?"""
    params = {
        "store": store,
        "holder": holder,
        "key": key,
        "token": token,
        "to": to,
        "reserve": reserve,
        "channel": free_channel(schema, store),
    }
    with driver_cursor(conn) as cursor:
        return cursor.execute(lease_statements(schema).hand_over, params).fetchone() is not None


def release_unclaimed(conn: sa.Connection, schema: str, store: str, holder: str, key: str) -> None:
    """Drop a lease handed over to ``holder`` that it never took (its load gave up)."""
    params = {
        "store": store,
        "holder": holder,
        "key": key,
        "channel": free_channel(schema, store),
    }
    with driver_cursor(conn) as cursor:
        cursor.execute(lease_statements(schema).release_unclaimed, params)


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


def request_handoff(conn: sa.Connection, holder: str, key: str, requester: str) -> None:
    """Ask a live holder to hand ``key`` over to ``requester`` (it may refuse)."""
    params = {"channel": holder_channel(holder), "payload": f"{requester} {key}"}
    conn.execute(_NOTIFY, params)


def parse_handoff_request(payload: str) -> tuple[str, str] | None:
    """``(requester holder, key)`` from a handoff request's payload, or None if malformed."""
    requester, _, key = payload.partition(" ")
    if len(requester) != 36 or not key:
        return None
    return requester, key


_NOTIFY = sa.text("SELECT pg_notify(:channel, :payload)")
_ALIVE = sa.text("SELECT " + ALIVE_SQL.format(holder="CAST(:holder AS uuid)"))

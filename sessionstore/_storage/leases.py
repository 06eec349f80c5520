"""Leases: the lock rows that give one holder exclusive use of a key.

Owns the ``locks`` table's statements. A lease row carries the holder id, a
fencing token drawn from a global sequence (so it only ever grows, for every
key, even across release and erase), and ``expires_at`` on the database
clock (``clock_timestamp()``: ``now()`` is frozen at the start of a
transaction). Each statement is a call of a server function (alembic
revision 0004), so that a lease row is locked only while one statement
runs, and so that the same calls run on Citus (docs/scaling.md#citus).
Rows are found by ``(store, key, token)``. The renewal waits a bounded
time for a row someone else has locked (an operator's ``SELECT ... FOR
UPDATE``) and then splits its keys, so that such a row puts only its own
key at risk. Releases and handovers announce the key on the store's free
channel, which wakes waiting loaders. The fence itself is part of every
write (:mod:`.files`).
"""

from __future__ import annotations

import functools
import os
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from ..db import driver_connection, driver_cursor
from .sql import free_channel, holder_channel
from .types import LeaseInfo, Renewal

__all__ = [
    "HOST",
    "HandoffRequest",
    "LeaseStatements",
    "acquire",
    "acquire_many",
    "acquire_params",
    "hand_over",
    "holder_alive",
    "info",
    "lease_statements",
    "release",
    "release_stale",
    "release_unclaimed",
    "release_unclaimed_all",
    "renew",
    "request_handoff",
]

HOST = socket.gethostname()


class LeaseStatements:
    """The lease SQL of one (validated) schema name: calls of its server functions.

    Each function (alembic revision 0004) is one statement that locks a
    lease row only while it runs: on Citus, single-shard statements on the
    key's worker, with ``nextval``, ``pg_locks`` and ``pg_notify`` on the
    coordinator (docs/scaling.md#citus).
    """

    def __init__(self, schema: str) -> None:
        s = f'"{schema}"'
        # Take the row if it is free (no row), expired, already ours (a
        # session we closed locally after losing track of it, or a key another
        # holder handed over to us), or held by a holder the caller saw dead
        # (advisory lock gone) for the whole grace and that is still dead now,
        # at the same token. The new token fences whatever the previous owner
        # still has in flight.
        self.acquire = sa.text(
            f"SELECT {s}.lease_acquire(:store, :key, CAST(:holder AS uuid), :duration, :host, "
            ":pid, :liveness, CAST(:dead_holder AS uuid), CAST(:dead_token AS bigint))"
        )
        # Many free or expired leases at once, taken in key order (offline
        # edits, imports); a key held by anyone else is left out. Ours: a
        # lease this holder no longer tracks (the caller claimed the keys in
        # its registry first, so nothing here uses them).
        self.acquire_many = sa.text(
            f"SELECT key, token FROM {s}.lease_acquire_many(:store, CAST(:keys AS text[]), "
            "CAST(:holder AS uuid), :duration, :host, :pid, :liveness)"
        )
        self.info = sa.text(f"SELECT * FROM {s}.lease_info(:store, :key)")
        # The liveness test (revision 0004's holder_alive: the holder's
        # session advisory lock in pg_locks of this server, Citus' coordinator).
        self.alive = sa.text(f"SELECT {s}.holder_alive(CAST(:holder AS uuid))")
        # Renew exactly the leases the holder still uses (a lease it no longer
        # tracks, after a release that failed, is left to expire), waiting at
        # most lock_timeout for a row someone else holds locked.
        self.renew = (
            f"SELECT key, token FROM {s}.lease_renew(%(store)s, %(holder)s, "
            "CAST(%(keys)s AS text[]), CAST(%(tokens)s AS bigint[]), %(duration)s, "
            "%(lock_timeout)s)"
        )
        self._letting_go(s)

    def _letting_go(self, s: str) -> None:
        # Release the given leases (ones already lost are skipped); each
        # released key is announced to waiters. Committed without waiting
        # for the WAL flush (revision 0006): see _leasing.Leases.
        self.release_one = (
            f"SELECT {s}.lease_release_one_async(%(store)s, %(holder)s, %(key)s, %(token)s, "
            "%(channel)s)"
        )
        self.release = (
            f"SELECT * FROM {s}.lease_release_async(%(store)s, %(holder)s, "
            "CAST(%(keys)s AS text[]), "
            "CAST(%(tokens)s AS bigint[]), %(channel)s) AS key"
        )
        # This holder's rows of the given keys, whatever their tokens (revision 0006).
        self.release_stale = (
            f"SELECT * FROM {s}.lease_release_stale(%(store)s, %(holder)s, "
            "CAST(%(keys)s AS text[]), %(channel)s) AS key"
        )
        # A lease handed to this holder that it never took (pid 0 marks the
        # reservation; taking it sets the taker's pid): let it go.
        self.release_unclaimed = (
            f"SELECT {s}.lease_release_unclaimed(%(store)s, %(key)s, %(holder)s, %(channel)s)"
        )
        self.release_unclaimed_all = (
            f"SELECT * FROM {s}.lease_release_unclaimed_all(%(store)s, %(holder)s, %(channel)s)"
        )
        # A handoff: the lease passes to the holder that asked for it (with a
        # new token and a short expiry, until that holder takes it properly),
        # so the process that handed it over cannot take it straight back.
        self.hand_over = (
            f"SELECT {s}.lease_hand_over(%(store)s, %(holder)s, %(key)s, %(token)s, "
            "CAST(%(to)s AS uuid), %(reserve)s, %(channel)s)"
        )


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
    params = acquire_params(store, key, holder, duration, liveness=liveness, dead=dead)
    token: int | None = conn.execute(lease_statements(schema).acquire, params).scalar()
    return token


def acquire_params(
    store: str, key: str, holder: str, duration: float, *, liveness: bool, dead: LeaseInfo | None
) -> dict[str, Any]:
    """The parameters of ``lease_acquire`` (and of ``lease_acquire_read``, beside the retention)."""
    return {
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
    sql_many = lease_statements(schema).acquire_many
    ordered = sorted(keys)
    params = {
        "store": store,
        "keys": ordered,
        "holder": holder,
        "duration": duration,
        "host": HOST,
        "pid": os.getpid(),
        "liveness": liveness,
    }
    taken = {row.key: int(row.token) for row in conn.execute(sql_many, params)}
    # In key order, as asked (Citus returns each shard's rows in turn).
    return {key: taken[key] for key in ordered if key in taken}


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
    *,
    wait: float,
) -> dict[str, int]:
    """Extend the given live ``(key, token)`` leases of ``holder`` in one statement.

    Returns what was renewed, ``{key: token}``; a lease missing from it has
    expired or was taken over. Raises psycopg's ``LockNotAvailable`` if a
    row stayed locked by someone else for ``wait`` seconds.
    """
    params = {
        **_pairs(store, holder, leases),
        "duration": duration,
        "lock_timeout": f"{max(1, int(wait * 1000))}ms",
    }
    # An explicit transaction: Citus passes the function's SET LOCAL
    # lock_timeout on to the workers only inside a transaction block.
    with driver_connection(conn).transaction(), driver_cursor(conn) as cursor:
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
    """The heartbeat: renew in one statement; split the keys around a locked row.

    A lease row locked by someone else (an operator's ``SELECT ... FOR
    UPDATE``) for ``wait`` seconds fails the statement; the keys are then
    renewed in halves, and halves of those, so that such a row puts only its
    own key at risk: it is reported ``busy`` (at risk, not lost), and the
    others are renewed with a few more statements (two per halving).
    """
    renewed: dict[str, int] = {}
    busy: set[str] = set()
    pending = [sorted(dict(leases).items())]
    while pending:
        part = pending.pop()
        try:
            renewed.update(renew(conn, schema, store, holder, duration, part, wait=wait))
        except Exception as exc:
            if getattr(exc, "sqlstate", None) != "55P03":  # lock_not_available
                raise
            if len(part) == 1:
                busy.add(part[0][0])
            else:
                middle = len(part) // 2
                pending += [part[:middle], part[middle:]]
    return Renewal(renewed, frozenset(busy))


def release(
    conn: sa.Connection, schema: str, store: str, holder: str, leases: Iterable[tuple[str, int]]
) -> None:
    """Drop the given ``(key, token)`` leases of ``holder`` (ones already lost are skipped)."""
    wanted = dict(leases)
    if not wanted:
        return
    sql = lease_statements(schema)
    channel = free_channel(schema, store)
    with driver_cursor(conn) as cursor:
        if len(wanted) == 1:
            ((key, token),) = wanted.items()
            one = {"store": store, "holder": holder, "key": key, "token": token}
            cursor.execute(sql.release_one, {**one, "channel": channel})
            return
        params = {**_pairs(store, holder, wanted.items()), "channel": channel}
        cursor.execute(sql.release, params, prepare=False)


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
        row = cursor.execute(lease_statements(schema).hand_over, params).fetchone()
    return bool(row is not None and row[0])


def release_stale(
    conn: sa.Connection, schema: str, store: str, holder: str, keys: Sequence[str]
) -> int:
    """Drop every lease row of ``holder`` for ``keys``, whatever its token; how many.

    Revision 0006. Only for keys the caller has claimed in its registry (no
    load of them runs): any such row is one it released and a crash kept.
    """
    params = {
        "store": store,
        "holder": holder,
        "keys": list(keys),
        "channel": free_channel(schema, store),
    }
    with driver_cursor(conn) as cursor:
        found = cursor.execute(lease_statements(schema).release_stale, params, prepare=False)
        return len(found.fetchall())


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


def release_unclaimed_all(conn: sa.Connection, schema: str, store: str, holder: str) -> int:
    """Drop every lease handed over to ``holder`` that it never took; how many (revision 0005)."""
    params = {"store": store, "holder": holder, "channel": free_channel(schema, store)}
    with driver_cursor(conn) as cursor:
        return len(
            cursor.execute(lease_statements(schema).release_unclaimed_all, params).fetchall()
        )


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


def holder_alive(conn: sa.Connection, schema: str, holder: str) -> bool:
    """Does ``holder`` hold its advisory lock, as other connections see it?"""
    return bool(conn.execute(lease_statements(schema).alive, {"holder": holder}).scalar())


@dataclass(frozen=True)
class HandoffRequest:
    """Another process asks for a key (a NOTIFY on the holder's channel)."""

    requester: str
    key: str
    waiting_since: int | None = None
    """The token of the first lease the requester found in its way: waiters
    that started earlier saw smaller tokens (one sequence for every key), so
    the holder promises the key to the longest waiter without comparing clocks."""


def request_handoff(
    conn: sa.Connection, holder: str, key: str, requester: str, waiting_since: int | None = None
) -> None:
    """Ask a live holder to hand ``key`` over to ``requester`` (it may refuse).

    With ``waiting_since``, two notifications: the plain request first, which
    a holder running a release before ``waiting_since`` existed understands
    (during a rolling deploy), then the one that carries the place in the
    queue; a newer holder takes both as one request.
    """
    channel, plain = holder_channel(holder), f"{requester} {key}"
    if waiting_since is None:
        conn.execute(_NOTIFY, {"channel": channel, "payload": plain})
        return
    placed = f"{requester}#{waiting_since} {key}"
    conn.execute(_NOTIFY_TWICE, {"channel": channel, "plain": plain, "placed": placed})


def parse_handoff_request(payload: str) -> HandoffRequest | None:
    """A handoff request's payload, ``requester[#waiting_since] key``; None if malformed."""
    head, _, key = payload.partition(" ")
    requester, mark, since = head[:36], head[36:37], head[37:]
    valid_since = since.isascii() and since.isdigit()
    if len(requester) != 36 or not key or (mark and (mark != "#" or not valid_since)):
        return None
    return HandoffRequest(requester, key, int(since) if mark else None)


_NOTIFY = sa.text("SELECT pg_notify(:channel, :payload)")
_NOTIFY_TWICE = sa.text("SELECT pg_notify(:channel, :plain), pg_notify(:channel, :placed)")

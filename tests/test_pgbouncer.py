"""The whole API through a real PgBouncer in transaction pooling mode (docs/scaling.md#pgbouncer).

Debian's pgbouncer (1.18: it keeps no prepared statement across
transactions) in front of the test PostgreSQL, started by
:mod:`pgbouncer_helpers` (installed with apt-get when missing; never
skipped). Stores and holder processes use it as ``dsn``; with
``control_dsn`` pointing at PostgreSQL itself everything works, instant
takeover and handoff included. psycopg's prepared statements are either
off (``prepared_statements=False``) or turned off by the store at the
first one the server lost, with one warning. Without ``control_dsn`` the
store warns at start and takes over only when leases expire.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from conftest import Sql, wait_until
from holder_child import Child
from pgbouncer_helpers import PgBouncer

import sessionstore as ss
from sessionstore import db
from sessionstore.retry import RetryPolicy, with_retries

MakeStore = Callable[..., ss.Store]
KEYS = [f"k{i:02d}" for i in range(20)]
ROUNDS = 30
PREPARED_WARNING = "prepared_statements=False"
CONTROL_WARNING = "the control connection is not a session of its own"


@pytest.fixture(scope="module")
def bouncer(sessionstore_dsn: str) -> Iterator[PgBouncer]:
    """One pgbouncer (transaction pooling) in front of the test server, for this module."""
    running = PgBouncer(sessionstore_dsn).start()
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
def pooled(make_store: MakeStore, bouncer: PgBouncer, sessionstore_dsn: str) -> MakeStore:
    """Stores whose ``dsn`` is the PgBouncer and whose ``control_dsn`` is PostgreSQL."""

    def make(**options: Any) -> ss.Store:
        options.setdefault("control_dsn", sessionstore_dsn)
        return make_store(dsn=bouncer.dsn, **options)

    return make


def warnings_with(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and text in r.getMessage()
    ]


def rounds_of_updates_and_saves(store: ss.Store) -> None:
    """20 keys, each updated and saved 30 times, one key after another."""
    for key in KEYS:
        store.load(key)
    for _ in range(ROUNDS):
        for key in KEYS:
            assert store.update(key, lambda d: d.update(coins=d["coins"] + 1) or True)
            store.save(key)


def assert_every_save_stored(sql: Sql) -> None:
    rows = sql.rows(
        "SELECT key, max(version) AS newest, count(*) AS saves FROM {s}.versions "
        "WHERE store = :store GROUP BY key ORDER BY key"
    )
    assert [(r.key, r.newest, r.saves) for r in rows] == [(k, ROUNDS, ROUNDS) for k in KEYS]


@pytest.mark.parametrize(
    "error", [psycopg.errors.DuplicatePreparedStatement, psycopg.errors.InvalidSqlStatementName]
)
def test_with_retries_turns_preparing_off_once_and_retries(
    error: type[psycopg.Error], caplog: pytest.LogCaptureFixture
) -> None:
    failures = [error("prepared statement lost"), error("in flight on another thread")]
    calls: list[str] = []

    def operation() -> str:
        calls.append("run")
        if failures:
            raise failures.pop(0)
        return "done"

    switched = iter([True, False])  # on the first time, already off the second
    policy = RetryPolicy(timeout=5.0, initial_delay=0.001)
    caplog.set_level(logging.WARNING, logger="sessionstore")
    assert with_retries(policy, "save", operation, unprepare=lambda: next(switched)) == "done"
    assert calls == ["run"] * 3
    assert len(warnings_with(caplog, PREPARED_WARNING)) == 1

    def lost() -> None:
        raise error("lost")

    # Without the hook (a caller that cannot turn them off) it is an answer, as before.
    with pytest.raises(ss.StorageUnavailableError, match=f"SQLSTATE {error.sqlstate}"):
        with_retries(policy, "save", lost)


def test_saves_with_prepared_statements_off(
    pooled: MakeStore, sql: Sql, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="sessionstore")
    store = pooled(prepared_statements=False)
    with store._engine.connect() as conn:  # what the option does to every pooled connection
        assert db.driver_connection(conn).prepare_threshold is None
    rounds_of_updates_and_saves(store)
    assert all(store.get(key)["coins"] == ROUNDS for key in KEYS)
    assert_every_save_stored(sql)
    assert not warnings_with(caplog, PREPARED_WARNING)
    assert not warnings_with(caplog, CONTROL_WARNING)
    assert store.config.prepared_statements is False


def test_a_lost_prepared_statement_turns_them_off_with_one_warning(
    pooled: MakeStore, sql: Sql, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="sessionstore")
    store = pooled()  # prepared_statements left on, as a new user would
    rounds_of_updates_and_saves(store)  # no error escapes
    assert all(store.get(key)["coins"] == ROUNDS for key in KEYS)
    assert_every_save_stored(sql)  # and no save was lost
    found = warnings_with(caplog, PREPARED_WARNING)
    assert len(found) == 1, found  # the server did lose one, and it was said once
    assert "SQLSTATE 42P05" in found[0] or "SQLSTATE 26000" in found[0], found
    with store._engine.connect() as conn:
        assert db.driver_connection(conn).prepare_threshold is None
    assert not warnings_with(caplog, "transient database error")


def test_tx_durable_updates_and_messages_through_pgbouncer(
    pooled: MakeStore, spawn: Callable[..., Child], bouncer: PgBouncer, sessionstore_dsn: str
) -> None:
    store = pooled(prepared_statements=False)
    store.load("a")
    store.load("b")
    for _ in range(6):  # past psycopg's prepare threshold, on every path
        assert store.update("a", lambda d: d.update(coins=d["coins"] + 10) or True, durable=True)
        assert store.tx(
            ["a", "b"],
            lambda docs: (
                docs["a"].update(coins=docs["a"]["coins"] - 1)
                or docs["b"].update(coins=docs["b"]["coins"] + 1)
                or True
            ),
        )
    assert store.peek("a")["coins"] == 54 and store.peek("b")["coins"] == 6  # durable on return

    holder = spawn(
        dsn=bouncer.dsn, control_dsn=sessionstore_dsn, prepared_statements=False, gift_handler=True
    )
    holder.ok("load", key="g")
    for gift in range(6):
        store.send_message("g", {"gift": gift})
    # Applied by the holder at once: its control connection heard the NOTIFY.
    wait_until(lambda: holder.ok("get", key="g").get("gifts") == list(range(6)), 5.0, "the gifts")


def test_takeover_after_kill_and_handoff_through_pgbouncer(
    pooled: MakeStore,
    spawn: Callable[..., Child],
    bouncer: PgBouncer,
    sessionstore_dsn: str,
) -> None:
    options = {"dsn": bouncer.dsn, "control_dsn": sessionstore_dsn, "prepared_statements": False}
    first = spawn(lock_duration=90.0, lock_refresh_interval=30.0, **options)
    second = spawn(lock_duration=90.0, lock_refresh_interval=30.0, lock_timeout=10.0, **options)
    first.ok("load", key="k")
    assert first.ok("add", key="k", coins=5, durable=True) is True
    second.ok("load", key="k", timeout=10.0)  # asked over NOTIFY, handed over by the first
    assert second.ok("get", key="k") == {"coins": 5}
    wait_until(lambda: first.ok("lost") == ["k"], 5.0, "the first to let the key go")
    assert second.ok("add", key="k", coins=2, durable=True) is True

    os.kill(second.pid, signal.SIGKILL)
    second.proc.wait(10.0)
    me = pooled(lock_timeout=10.0, prepared_statements=False)
    started = time.monotonic()
    me.load("k")  # its advisory lock went with it: no waiting for the 90 s lease
    waited = time.monotonic() - started
    assert waited < 2.0 + 3.0, f"took {waited:.1f} s to take over a dead holder"
    assert me.get("k") == {"coins": 7}


def test_without_control_dsn_it_warns_and_takes_over_only_at_expiry(
    make_store: MakeStore,
    spawn: Callable[..., Child],
    bouncer: PgBouncer,
    sql: Sql,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="sessionstore")
    holder = spawn(
        dsn=bouncer.dsn, prepared_statements=False, lock_duration=3.0, lock_refresh_interval=1.0
    )
    holder.ok("load", key="k")
    assert holder.ok("add", key="k", coins=4, durable=True) is True
    assert CONTROL_WARNING in holder.errors()  # its own log, on its stderr
    # Its advisory lock does look held (it stays on whichever server connection
    # took it), so the lease says there is none to trust.
    assert sql.scalar("SELECT liveness FROM {s}.locks WHERE store = :store AND key = 'k'") is False
    os.kill(holder.pid, signal.SIGKILL)
    holder.proc.wait(10.0)
    expires = sql.scalar("SELECT expires_at FROM {s}.locks WHERE store = :store AND key = 'k'")

    me = make_store(dsn=bouncer.dsn, prepared_statements=False, lock_timeout=10.0)
    assert len(warnings_with(caplog, CONTROL_WARNING)) == 1
    me.load("k")
    acquired = sql.scalar("SELECT acquired_at FROM {s}.locks WHERE store = :store AND key = 'k'")
    assert acquired >= expires, "taken before the dead holder's lease expired"
    assert me.get("k") == {"coins": 4}


def test_a_schema_created_through_pgbouncer_leaves_no_lock_behind(
    bouncer: PgBouncer, sessionstore_dsn: str, store_name: str
) -> None:
    schema = f"t_{store_name[-8:]}"
    direct = sa.create_engine(db.resolve_url(sessionstore_dsn), pool_size=1)
    try:
        options = {"control_dsn": sessionstore_dsn, "prepared_statements": False}
        with ss.Store(store_name, {}, dsn=bouncer.dsn, db_schema=schema, **options):
            pass
        with direct.connect() as conn:  # a session lock left on a pooled server connection
            free = conn.execute(
                sa.text("SELECT pg_try_advisory_xact_lock(:k)"), {"k": db.migrate_lock_key(schema)}
            ).scalar()
            conn.rollback()
        assert free, "the migration lock is still held by a server connection of the pool"
    finally:
        with direct.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        db.clear_schema_cache()
        direct.dispose()

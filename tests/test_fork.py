"""A Store created before ``os.fork()`` acts in the child as a fresh Store (DESIGN §6).

gunicorn ``--preload``, Celery prefork and ``multiprocessing`` with the fork
start method all create the Store in a parent and fork children that inherit
it. The child must behave as a Store that has loaded nothing: its own holder
id, connections and threads (started on first use); it never writes, renews
or releases the parent's leases, never closes the parent's sockets, and its
exit (atexit included) does no I/O on the parent's behalf. zstd's
multi-threaded compressors cached by the parent must not hang the child's
first large save.

The children here are real ``os.fork()`` children of the pytest process. Each
runs a body, then exits the way an interpreter does (``atexit`` handlers
first, where sessionstore closes its open Stores) and ``os._exit`` so that it
never returns into pytest. The parent waits for it with a deadline and kills
it (SIGKILL) if it hangs, so a hang fails the test instead of blocking it.
"""

from __future__ import annotations

import atexit
import ctypes
import json
import logging
import multiprocessing
import os
import random
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import orjson
import pytest
import sqlalchemy as sa
from conftest import wait_until

import sessionstore as ss
from sessionstore import db

MakeStore = Callable[..., ss.Store]

CHILD_TIMEOUT = 60.0
"""How long a child may run before it is killed and the test fails."""

BIG_DOCUMENT = 9 * 1024 * 1024
"""Above the 8 MiB at which the save streams and zstd compresses with worker threads."""


# -- the database as an observer sees it --------------------------------------------------


@dataclass
class Observer:
    """Reads the store's tables and PostgreSQL's views on a connection of its own."""

    engine: sa.Engine
    schema: str
    store: str

    def _rows(self, sql: str, **params: Any) -> list[tuple[Any, ...]]:
        with self.engine.connect() as conn:
            return [tuple(row) for row in conn.execute(sa.text(sql), params)]

    def lease(self, key: str) -> tuple[str, int, Any] | None:
        """The key's lease row: (holder, token, expires_at), or None if there is none."""
        rows = self._rows(
            f'SELECT holder::text, token, expires_at FROM "{self.schema}".locks '
            "WHERE store = :store AND key = :key",
            store=self.store,
            key=key,
        )
        return (rows[0][0], rows[0][1], rows[0][2]) if rows else None

    def leased_keys(self) -> list[str]:
        rows = self._rows(
            f'SELECT key FROM "{self.schema}".locks WHERE store = :store ORDER BY key',
            store=self.store,
        )
        return [row[0] for row in rows]

    def versions(self, key: str) -> list[tuple[int, str, int]]:
        """The key's versions, oldest first: (version, holder, token)."""
        rows = self._rows(
            f'SELECT version, holder::text, token FROM "{self.schema}".versions '
            "WHERE store = :store AND key = :key ORDER BY version",
            store=self.store,
            key=key,
        )
        return [(row[0], row[1], row[2]) for row in rows]

    def sessionstore_backends(self) -> set[int]:
        """Backend pids of every sessionstore connection (pools and control connections)."""
        rows = self._rows(
            "SELECT pid FROM pg_stat_activity "
            "WHERE datname = current_database() AND application_name LIKE 'sessionstore%' "
            "AND pid <> pg_backend_pid()"
        )
        return {row[0] for row in rows}

    def advisory_lock_backend(self, holder: str) -> int | None:
        """The backend holding ``holder``'s proof-of-life advisory lock (its control connection).

        The lock is ``pg_advisory_lock(hashtext('sessionstore.holder'), hashtext(holder))``
        (sessionstore/_storage/sql.py), which pg_locks shows as classid/objid, objsubid 2.
        """
        rows = self._rows(
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted AND objsubid = 2 "
            "AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) "
            "AND classid = (hashtext('sessionstore.holder')::bigint & 4294967295)::oid "
            "AND objid = (hashtext(:holder)::bigint & 4294967295)::oid",
            holder=holder,
        )
        return rows[0][0] if rows else None


@pytest.fixture
def observer(
    sessionstore_dsn: str, sessionstore_schema: str, store_name: str
) -> Iterator[Observer]:
    engine = sa.create_engine(
        db.resolve_url(sessionstore_dsn),
        poolclass=sa.NullPool,
        connect_args={"application_name": "fork-test-observer"},
    )
    try:
        yield Observer(engine, sessionstore_schema, store_name)
    finally:
        engine.dispose()


# -- forking ------------------------------------------------------------------------------


class _Records(logging.Handler):
    """Keeps the child's sessionstore warnings and errors (its exit included) for the report."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.levelname}: {record.getMessage()}")


def _child_main(body: Callable[[], dict[str, Any]], report: Path) -> NoReturn:
    """The forked child: run ``body``, exit like an interpreter does, never return to pytest."""
    code = 70
    outcome: dict[str, Any] = {"ok": False, "error": "the child did not finish"}
    records = _Records()
    logging.getLogger("sessionstore").addHandler(records)
    try:
        try:
            outcome = {"ok": True, "result": body()}
        except BaseException:
            outcome = {"ok": False, "error": traceback.format_exc()}
        sys.exit(0 if outcome["ok"] else 1)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    finally:
        # A normal interpreter exit runs the atexit handlers (sessionstore closes
        # its open Stores there); os._exit then keeps pytest from going on in here.
        try:
            atexit._run_exitfuncs()
        except BaseException:
            outcome["atexit_error"] = traceback.format_exc()
        try:
            outcome["logged"] = records.lines
            report.write_text(json.dumps(outcome, default=str))
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def fork(body: Callable[[], dict[str, Any]], report: Path, *, hooks: bool = True) -> int:
    """Fork a child running ``body`` (see :func:`_child_main`); its pid.

    ``hooks=False`` forks the way uWSGI does without ``lazy-apps``: libc's
    fork(), so Python's ``os.register_at_fork`` hooks never run in the child.
    """
    pid = os.fork() if hooks else ctypes.CDLL(None).fork()
    if pid == 0:
        _child_main(body, report)
    return pid


def wait_child(pid: int, report: Path, timeout: float = CHILD_TIMEOUT) -> dict[str, Any]:
    """Wait for the child with a deadline (SIGKILL past it: a hang fails); its report."""
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError(f"forked child {pid} still running after {timeout}s: killed")
        time.sleep(0.02)
    code = os.waitstatus_to_exitcode(status)
    outcome: dict[str, Any] = json.loads(report.read_text()) if report.exists() else {}
    assert code == 0 and outcome.get("ok"), (
        f"forked child exited with {code}: {outcome.get('error', outcome)}"
    )
    assert "atexit_error" not in outcome, outcome["atexit_error"]
    assert outcome["logged"] == [], f"the child logged at exit: {outcome['logged']}"
    result: dict[str, Any] = outcome["result"]
    return result


# -- helpers --------------------------------------------------------------------------------


def add_coins(n: int) -> Callable[[Any], bool]:
    def fn(data: Any) -> bool:
        data["coins"] += n
        return True

    return fn


def set_inventory(items: list[str]) -> Callable[[Any], bool]:
    def fn(data: Any) -> bool:
        data["inventory"] = items
        return True

    return fn


def big_inventory(seed: int, size: int = BIG_DOCUMENT) -> list[str]:
    """Random but compressible strings (a vocabulary of words) of ``size`` bytes as JSON."""
    rng = random.Random(seed)
    vocabulary = [
        "".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(3, 10))) for _ in range(600)
    ]
    items: list[str] = []
    total = 0
    while total < size:
        item = " ".join(rng.choices(vocabulary, k=12)) + f" #{len(items)}"
        items.append(item)
        total += len(item) + 3  # quotes and comma
    return items


# -- a. a child that only exits ---------------------------------------------------------


def test_child_exit_leaves_the_parents_keys_leases_and_connections_alone(
    make_store: MakeStore, observer: Observer, tmp_path: Path
) -> None:
    lost: list[str] = []
    store = make_store(lock_duration=5.0, lock_refresh_interval=0.2, on_lock_lost=lost.append)
    store.load("p")
    store.update("p", add_coins(5))  # changed, never saved: the child's exit must not save it
    parent_holder = store.holder
    lease_before = observer.lease("p")
    assert lease_before is not None and lease_before[0] == parent_holder
    versions_before = observer.versions("p")
    control_backend = observer.advisory_lock_backend(parent_holder)
    assert control_backend is not None
    backends_before = observer.sessionstore_backends()
    assert control_backend in backends_before

    report = tmp_path / "child.json"
    pid = fork(lambda: {"pid": os.getpid()}, report)
    assert wait_child(pid, report)["pid"] == pid

    # The child's exit saved nothing, released nothing: the lease is the parent's, same token.
    lease_after = observer.lease("p")
    assert lease_after is not None, "the child's exit deleted the parent's lease row"
    assert lease_after[:2] == lease_before[:2]
    assert observer.versions("p") == versions_before, "the child's exit wrote the parent's key"
    # It closed none of the parent's connections: every backend is still there, and the
    # control connection (the parent's proof of life) is the same one, never reconnected.
    gone = backends_before - observer.sessionstore_backends()
    assert not gone, f"the child's exit terminated the parent's backends {gone}"
    assert observer.advisory_lock_backend(parent_holder) == control_backend
    # The parent's heartbeat still renews its lease.
    wait_until(
        lambda: (lease := observer.lease("p")) is not None and lease[2] > lease_after[2],
        5.0,
        "the parent's heartbeat to renew its lease after the child exited",
    )

    # The parent goes on as before: its unsaved change is still there, and it saves.
    assert store.get("p") == {"coins": 5, "inventory": []}
    assert not store.is_saved("p")
    store.save("p")
    store.update("p", add_coins(1))
    store.save("p")
    versions = observer.versions("p")
    assert len(versions) == len(versions_before) + 2
    assert {holder for _, holder, _ in versions} == {parent_holder}
    assert store.probe_lock_active("p")

    # Its control connection still hears handoff requests: another Store gets the key.
    other = make_store(lock_timeout=10.0)
    started = time.monotonic()
    other.load("p")
    assert time.monotonic() - started < 5.0
    assert other.get("p") == {"coins": 6, "inventory": []}
    wait_until(lambda: lost == ["p"], 5.0, "on_lock_lost('p') in the parent")


# -- b. a child that uses the inherited store -----------------------------------------------


def test_child_using_the_inherited_store_is_a_fresh_holder(
    make_store: MakeStore, observer: Observer, tmp_path: Path
) -> None:
    store = make_store(
        lock_timeout=1.0, lock_refresh_interval=0.2, on_handoff_request=lambda key: False
    )
    store.load("p")
    store.update("p", add_coins(3))
    store.save("p")
    store.update("p", add_coins(4))  # unsaved at the fork
    parent_holder = store.holder
    lease_before = observer.lease("p")
    assert lease_before is not None

    def child() -> dict[str, Any]:
        holder = store.holder
        assert holder != parent_holder
        with pytest.raises(ss.KeyNotLoadedError):
            store.get("p")
        with pytest.raises(ss.KeyNotLoadedError):
            store.update("p", add_coins(100))
        started = time.monotonic()
        with pytest.raises(ss.LockUnavailableError):
            store.load("p")  # the parent holds it and refuses to hand it over
        waited = time.monotonic() - started
        assert waited < store.lock_timeout + 5.0, waited  # within its lock_timeout (and slack)
        store.load("c")
        assert store.update("c", add_coins(2)) is True
        store.save("c")
        assert store.update("c", add_coins(1)) is True  # saved by close() at exit
        return {"holder": holder, "waited": waited}

    report = tmp_path / "child.json"
    result = wait_child(fork(child, report), report)
    child_holder = result["holder"]
    assert child_holder != parent_holder

    # The parent's key: same lease, only the parent's versions.
    lease_after = observer.lease("p")
    assert lease_after is not None and lease_after[:2] == lease_before[:2]
    assert {holder for _, holder, _ in observer.versions("p")} == {parent_holder}
    # The child's key: written under the child's holder, released by its close at exit.
    versions_c = observer.versions("c")
    assert versions_c and {holder for _, holder, _ in versions_c} == {child_holder}
    assert observer.lease("c") is None
    assert store.peek("c") == {"coins": 3, "inventory": []}

    # The parent saves its key as if nothing happened, and lets it go.
    assert store.get("p") == {"coins": 7, "inventory": []}
    store.save("p")
    store.update("p", add_coins(1))
    store.unload("p")
    assert {holder for _, holder, _ in observer.versions("p")} == {parent_holder}
    assert observer.lease("p") is None
    assert store.peek("p") == {"coins": 8, "inventory": []}


# -- d. multiprocessing with the fork start method ---------------------------------------

_INHERITED: ss.Store | None = None
"""The store a Pool's workers inherit (as a module-level store of an application)."""

SESSIONS_PER_WORKER = 3


def _pool_work(index: int) -> dict[str, Any]:
    store = _INHERITED
    assert store is not None
    key = f"w{index}"
    seen: list[int] = []
    for _ in range(SESSIONS_PER_WORKER):
        with store.session(key) as s:
            assert s.update(add_coins(1)) is True
            seen.append(int(s.get()["coins"]))
    try:
        store.get("parent")
        parent_key_loaded = True
    except ss.KeyNotLoadedError:
        parent_key_loaded = False
    return {
        "key": key,
        "seen": seen,
        "holder": store.holder,
        "pid": os.getpid(),
        "parent_key_loaded": parent_key_loaded,
    }


def test_multiprocessing_fork_pool_workers_use_the_inherited_store(
    make_store: MakeStore, observer: Observer
) -> None:
    global _INHERITED
    store = make_store(lock_refresh_interval=0.5)
    store.load("parent")
    store.update("parent", add_coins(9))  # unsaved while the workers run
    parent_holder = store.holder
    lease_before = observer.lease("parent")
    assert lease_before is not None
    _INHERITED = store
    try:
        context = multiprocessing.get_context("fork")
        with context.Pool(2) as pool:
            results = pool.map_async(_pool_work, range(4)).get(timeout=CHILD_TIMEOUT)
    finally:
        _INHERITED = None

    assert sorted(r["key"] for r in results) == ["w0", "w1", "w2", "w3"]
    for result in results:
        assert result["seen"] == [1, 2, 3], result
        assert result["holder"] != parent_holder
        assert result["pid"] != os.getpid()
        assert result["parent_key_loaded"] is False
        assert store.peek(result["key"]) == {"coins": SESSIONS_PER_WORKER, "inventory": []}
        holders = {holder for _, holder, _ in observer.versions(result["key"])}
        assert holders == {result["holder"]}
    assert len({r["holder"] for r in results}) == len({r["pid"] for r in results})
    assert observer.leased_keys() == ["parent"]  # every worker's session released its key

    # The parent's key: same lease, nothing written, its change still pending.
    lease_after = observer.lease("parent")
    assert lease_after is not None and lease_after[:2] == lease_before[:2]
    assert observer.versions("parent") == []
    assert store.get("parent") == {"coins": 9, "inventory": []}
    assert not store.is_saved("parent")
    store.save("parent")
    assert {holder for _, holder, _ in observer.versions("parent")} == {parent_holder}


# -- c. a large save in the child after the parent's ------------------------------------
#
# Last in the file, on purpose: should a zstd context with worker threads ever be cached
# by this (the pytest) process again, every child forked after it, in any test, would
# hang too; last in the file, only these tests fail then.


@pytest.mark.parametrize("saved_by", ["autosave", "save"])
def test_child_large_save_after_the_parent_did_one_does_not_hang(
    make_store: MakeStore, observer: Observer, tmp_path: Path, saved_by: str
) -> None:
    store = make_store(
        lock_refresh_interval=0.5, autosave_interval=0.3 if saved_by == "autosave" else 60.0
    )
    parent_items = big_inventory(seed=1)
    assert len(orjson.dumps({"coins": 0, "inventory": parent_items})) >= BIG_DOCUMENT
    store.load("big-p")
    store.update("big-p", set_inventory(parent_items))
    # A save of 8 MiB or more compresses with zstd's worker threads, which a forked child
    # does not have. The old code cached that context per thread, and the child hung:
    # "save" cached it on this, the main thread, the one the child goes on with (freeing
    # it in the child, or using it, waited forever for the parent's zstd threads);
    # "autosave" on the store's worker thread, alive at the fork, whose thread state the
    # child discards (freeing its context hung inside os.fork() itself).
    if saved_by == "save":
        store.save("big-p")
    else:
        wait_until(lambda: store.is_saved("big-p"), 30.0, "the autosave of the big document")
    parent_holder = store.holder
    lease_before = observer.lease("big-p")
    versions_before = observer.versions("big-p")

    def child() -> dict[str, Any]:
        items = big_inventory(seed=2)
        started = time.monotonic()
        store.load("big-c")
        store.update("big-c", set_inventory(items))
        store.save("big-c")  # on the main thread too: the thread the parent compressed on
        return {"holder": store.holder, "seconds": time.monotonic() - started}

    report = tmp_path / "child.json"
    result = wait_child(fork(child, report), report)
    assert result["holder"] != parent_holder

    expected = big_inventory(seed=2)
    assert store.peek("big-c") == {"coins": 0, "inventory": expected}
    assert {holder for _, holder, _ in observer.versions("big-c")} == {result["holder"]}
    assert observer.lease("big-c") is None  # released by the child's close at exit

    # The parent's key and its own compressor are untouched.
    lease_after = observer.lease("big-p")
    assert lease_before is not None and lease_after is not None
    assert lease_after[:2] == lease_before[:2]
    assert observer.versions("big-p") == versions_before
    store.update("big-p", add_coins(1))
    store.save("big-p")
    assert store.peek("big-p") == {"coins": 1, "inventory": parent_items}


def _pool_change(key: str) -> str:
    """In a pool worker: load a key and change it, unsaved; the worker's exit must save it."""
    assert _INHERITED is not None
    _INHERITED.load(key)
    _INHERITED.update(key, add_coins(5))
    return _INHERITED.holder


def test_pool_worker_exit_saves_and_releases_its_keys(
    make_store: MakeStore, observer: Observer
) -> None:
    """multiprocessing (and Celery's billiard) children end with os._exit(), skipping atexit:
    their Stores are closed by the pool's own exit finalizers instead."""
    global _INHERITED
    store = make_store(lock_refresh_interval=0.5)
    _INHERITED = store
    try:
        context = multiprocessing.get_context("fork")
        pool = context.Pool(1)
        try:
            holder = pool.apply_async(_pool_change, ("pooled",)).get(timeout=CHILD_TIMEOUT)
        finally:
            pool.close()  # workers exit normally (not terminate(): that is SIGTERM)
            pool.join()
    finally:
        _INHERITED = None
    assert holder != store.holder
    assert store.peek("pooled") == {"coins": 5, "inventory": []}, "the change was saved"
    assert observer.lease("pooled") is None, "the lease was released at the worker's exit"


def test_a_fork_without_pythons_hooks_is_caught_by_the_pid(
    make_store: MakeStore, observer: Observer, tmp_path: Path
) -> None:
    """uWSGI forks workers without Python's fork hooks (unless lazy-apps or
    py-call-osafterfork): the Store notices the new pid on its next call."""
    store = make_store(lock_refresh_interval=0.5, on_handoff_request=lambda key: False)
    store.load("p")
    parent_holder = store.holder
    lease_before = observer.lease("p")

    def child() -> dict[str, Any]:
        store.load("c")  # the first call that does I/O sees the new pid
        store.update("c", add_coins(2))
        store.save("c")
        return {"holder": store.holder}

    report = tmp_path / "child.json"
    result = wait_child(fork(child, report, hooks=False), report)
    assert result["holder"] != parent_holder
    assert store.peek("c") == {"coins": 2, "inventory": []}
    assert observer.lease("c") is None
    assert observer.lease("p") == lease_before, "the parent's lease was left alone"
    store.update("p", add_coins(1))
    store.save("p")


def test_a_store_dropped_without_close_is_closed_at_exit(
    sessionstore_dsn: str, sessionstore_schema: str, store_name: str, observer: Observer
) -> None:
    """A Store garbage-collected before close() still saves and releases at exit."""
    script = f"""
import gc, sessionstore as ss
store = ss.Store({store_name!r}, {{"coins": 0}}, dsn={sessionstore_dsn!r},
                 db_schema={sessionstore_schema!r})
store.load("dropped")
store.update("dropped", lambda d: d.update(coins=7) is None)
del store
gc.collect()
"""
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)
    assert observer.lease("dropped") is None
    with observer.engine.connect() as conn:
        versions = conn.execute(
            sa.text(
                f'SELECT count(*) FROM "{sessionstore_schema}".versions '
                "WHERE store = :s AND key = 'dropped'"
            ),
            {"s": store_name},
        ).scalar()
    assert versions == 1

"""Failover to a synchronous standby (docs/scaling.md, "Failover to a standby").

A primary and a streaming standby named in ``synchronous_standby_names``
(tests/failover_helpers.py). Every Store, in holder child processes and in
this one, is pointed at both from the start through one multi-host DSN
(``target_session_attrs=read-write``). The primary's postmaster is SIGKILLed
in the middle of loads and saves and the standby is promoted; then:

* every save, durable update and ``tx`` acknowledged before the kill is in
  the promoted server's data (checked by the idempotency keys each carried:
  they are written in the same statement as the version);
* a durable update whose commit was in flight at the kill is acknowledged
  and stored once, whether or not the standby had received that commit;
* a holder that lost its lease across the promotion (instant takeover or
  expiry) is refused, and no version carries a token older than one already
  used for its key;
* every store recovers by itself within ``retry_timeout`` (no call fails),
  and its control connection comes back to the new primary: advisory lock
  (liveness) and LISTEN (a live handoff needs both);
* fencing tokens (the ``lease_tokens`` sequence) keep growing across the
  promotion;
* a dead primary that does not answer (rather than refusing) costs one
  ``connect_timeout`` per connection, the control connection's too.

The last test shows what an asynchronous standby loses instead, and that
the fence still holds there. The measured figures are printed (``-s``) and
quoted in docs/scaling.md.
"""

from __future__ import annotations

import functools
import itertools
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from failover_helpers import CONNECT_TIMEOUT, Pair, black_hole, poll
from holder_child import Child

import sessionstore as ss
from sessionstore import db
from sessionstore.testing import RESOLVED_ENV

pytestmark = [
    pytest.mark.skipif(not hasattr(signal, "SIGSTOP"), reason="needs POSIX signals"),
    # Its own primary and standby: the same run on the Citus step would add nothing.
    pytest.mark.plain_postgres,
]

SCHEMA = "failover"
RETRY = 8.0
# retry_timeout well above a promotion (0.1-0.3 s here) and far below the
# 90 s default lease: the outage must be ridden out by retries alone.
OPTIONS: dict[str, Any] = {"retry_timeout": RETRY, "idempotency_retention": 100_000}

RETRYING = "transient database error, retrying"  # sessionstore's log line for a retry
MakeStore = Callable[..., ss.Store]
Spawn = Callable[..., Child]


# -- the pair, and the plugin's fixtures pointed at it ----------------------------------


@pytest.fixture(scope="module")
def pair() -> Iterator[Pair]:
    servers = Pair()
    try:
        servers.start()
        yield servers
    finally:
        servers.stop()


@pytest.fixture(scope="module")
def sessionstore_dsn(pair: Pair) -> Iterator[str]:
    """Overrides the plugin's: ``make_store`` and ``spawn`` (conftest) use the multi-host DSN.

    Holder children read ``$SESSIONSTORE_TEST_DSN_RESOLVED``.
    """
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(RESOLVED_ENV, pair.dsn)
        yield pair.dsn


@pytest.fixture(scope="module")
def sessionstore_schema(sessionstore_dsn: str) -> str:
    """Overrides the plugin's: one schema on the pair for this module (it follows promotions)."""
    engine = db.create_engine(sessionstore_dsn, pool_size=1)
    try:
        db.ensure_schema(engine, SCHEMA)
    finally:
        engine.dispose()
    return SCHEMA


@pytest.fixture(autouse=True)
def healthy(pair: Pair, sessionstore_schema: str) -> Pair:
    """Every test starts from a primary with a streaming synchronous standby."""
    pair.rebuild()
    return pair


def on_primary(pair: Pair, statement: str, **params: Any) -> list[Any]:
    """Rows from the current primary alone (``{s}``: the schema); never the old one."""
    return pair.execute(pair.primary, statement.replace("{s}", f'"{SCHEMA}"'), **params)


def on_standby(pair: Pair, statement: str, **params: Any) -> list[Any]:
    """Rows from the standby alone (``{s}``: the schema)."""
    return pair.execute(pair.standby, statement.replace("{s}", f'"{SCHEMA}"'), **params)


def versions(pair: Pair, store: str) -> dict[str, list[Any]]:
    """Each key's versions on the current primary, oldest first."""
    found: dict[str, list[Any]] = {}
    for row in on_primary(
        pair,
        "SELECT key, version, token, holder::text AS holder FROM {s}.versions "
        "WHERE store = :store ORDER BY key, version",
        store=store,
    ):
        found.setdefault(row.key, []).append(row)
    return found


def assert_tokens_never_go_back(pair: Pair, store: str) -> None:
    """No version is written with a token older than one its key already had."""
    for key, rows in versions(pair, store).items():
        tokens = [row.token for row in rows]
        assert tokens == sorted(tokens), f"key {key!r}: tokens by version {tokens}"


# -- 1. acknowledged writes -------------------------------------------------------------


@dataclass
class Op:
    what: str
    started: float
    ended: float
    ok: bool
    answer: dict[str, Any]


@dataclass
class Workload:
    """One holder child in a loop on its own thread: durable updates, saves, tx, unload, load.

    ``acked`` gets the (key, idempotency key) pairs that a call reported
    written: a durable update's own, a ``tx``'s on both keys, and for a
    save or an unload those of the non-durable updates it carried.
    """

    child: Child
    name: str
    ops: list[Op] = field(default_factory=list)
    acked: set[tuple[str, str]] = field(default_factory=set)
    stop: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self._guarded, daemon=True)
        thread.start()
        return thread

    def _guarded(self) -> None:
        try:
            self._run()
        except BaseException as exc:
            self.error = exc

    def _call(self, what: str, written: list[tuple[str, str]], op: str, **args: Any) -> bool:
        started = time.monotonic()
        answer = self.child.call(op, timeout=RETRY + 10.0, **args)
        self.ops.append(Op(what, started, time.monotonic(), answer["ok"], answer))
        if answer["ok"]:
            self.acked.update(written)
        return bool(answer["ok"])

    def _run(self) -> None:
        a, b = f"{self.name}-a", f"{self.name}-b"
        unsaved: list[tuple[str, str]] = []  # b's updates waiting for a save
        turn = 0
        while not self.stop.is_set():
            if not self.ops or not self.ops[-1].ok:
                # First, and after a failed call (a lost lease closes the
                # session): load again; unsaved updates went with the session.
                unsaved = []
                for key in (a, b):
                    self._call("load", [], "load", key=key)
            rid = f"{self.name}-{turn}"
            self._call(
                "durable", [(a, rid + "d")], "add", key=a, coins=1, durable=True, rid=rid + "d"
            )
            if self._call("update", [], "add", key=b, coins=1, rid=rid + "s"):
                unsaved.append((b, rid + "s"))
            if self._call("save", unsaved, "save", key=b):
                unsaved = []
            both = [(a, rid + "t"), (b, rid + "t")]
            self._call("tx", both, "tx", keys=[a, b], coins=1, rid=rid + "t")
            if turn % 3 == 2 and self._call("unload", unsaved, "unload", key=b):
                unsaved = []
                self._call("load", [], "load", key=b)
            turn += 1


def test_no_acknowledged_write_is_lost_when_the_primary_dies_mid_workload(
    pair: Pair, spawn: Spawn, store_name: str
) -> None:
    workloads = [Workload(spawn(**OPTIONS), f"w{i}") for i in range(3)]
    threads = [w.start() for w in workloads]
    poll(lambda: all(len(w.ops) >= 20 for w in workloads), 30.0, "the workloads to run")

    killed_at, promoted_at = pair.fail_over()
    poll(
        lambda: all(sum(op.started > promoted_at for op in w.ops) >= 8 for w in workloads),
        RETRY + 10.0,
        "every workload to make progress on the promoted server",
    )
    for w in workloads:
        w.stop.set()
    for thread in threads:
        thread.join(RETRY + 15.0)
    for w in workloads:
        assert w.error is None, f"{w.name}: {w.error!r}\n{w.child.errors()}"

    in_flight = [op for w in workloads for op in w.ops if op.started < killed_at < op.ended]
    assert in_flight, "no call was under way when the primary died"
    for w in workloads:
        first = min(op.ended for op in w.ops if op.ended > promoted_at)
        print(
            f"\nfailover: {w.name} first acknowledged write {first - promoted_at:.3f} s "
            "after the promotion was asked for"
        )

    stored = {
        (row.key, row.request_id)
        for row in on_primary(
            pair,
            "SELECT key, request_id FROM {s}.applied_requests WHERE store = :store",
            store=store_name,
        )
    }
    acked = set().union(*(w.acked for w in workloads))
    missing = sorted(acked - stored)
    assert not missing, f"{len(missing)} of {len(acked)} acknowledged writes lost: {missing[:5]}"
    for w in workloads:  # and every store rode the failover out: not one call failed
        failed = [op for op in w.ops if not op.ok]
        assert not failed, f"{w.name}: calls failed across the failover: {failed[:3]}"
    assert_tokens_never_go_back(pair, store_name)
    print(f"failover: {len(acked)} acknowledged writes, {len(in_flight)} in flight at the kill")


@pytest.mark.parametrize("reached", ["the standby", "the primary alone"])
def test_a_durable_update_in_flight_when_the_primary_dies_is_written_once(
    pair: Pair, spawn: Spawn, store_name: str, reached: str
) -> None:
    """Its commit is made on the primary, which dies before it can acknowledge it.

    ``the standby``: the standby received the commit (its walreceiver was
    frozen with the WAL in its socket, and let go after the kill), so the
    promoted server has the version the holder never heard of; its retry
    finds it there, its own (holder, token, checksum), and counts it
    written. ``the primary alone``: the walsender was frozen, the promoted
    server lacks it, and the retry writes it. Either way: acknowledged
    once, stored once, no version skipped.
    """
    child = spawn(**OPTIONS)
    child.ok("load", key="k")
    assert child.ok("add", key="k", coins=1, durable=True, rid="r1") is True
    receiver = pair.freeze_receiver() if reached == "the standby" else None
    if receiver is None:
        pair.freeze_replication()
    child.send("add", key="k", coins=1, durable=True, rid="r2")
    poll(
        lambda: on_primary(
            pair, "SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'SyncRep'"
        )[0][0],
        10.0,
        "the commit to wait for the standby",
    )
    lsn = pair.wait_sent() if receiver is not None else ""
    killed = time.time()
    pair.kill_primary()
    if receiver is not None:
        pair.thaw_receiver(receiver, lsn)
    pair.promote()

    assert child.receive(timeout=RETRY + 10.0) == {"ok": True, "result": True}
    rows = on_primary(
        pair,
        "SELECT version, extract(epoch FROM created_at) AS at FROM {s}.versions "
        "WHERE store = :store AND key = 'k' ORDER BY version",
        store=store_name,
    )
    assert [r.version for r in rows] == [1, 2]
    # Which server wrote version 2: the old primary (before the kill) or the new one.
    assert (rows[1].at < killed) == (receiver is not None), (rows[1].at, killed)
    applied = on_primary(
        pair,
        "SELECT request_id FROM {s}.applied_requests WHERE store = :store AND key = 'k'",
        store=store_name,
    )
    assert sorted(row.request_id for row in applied) == ["r1", "r2"]
    assert child.ok("get", key="k") == {"coins": 2}
    assert child.ok("add", key="k", coins=1, durable=True, rid="r3") is True
    assert_tokens_never_go_back(pair, store_name)


# -- 2. no writes under a lease that is gone ----------------------------------------------


@pytest.mark.parametrize("takeover", ["instant", "expiry"])
def test_a_holder_frozen_across_the_promotion_is_fenced_out(
    pair: Pair, spawn: Spawn, make_store: MakeStore, store_name: str, takeover: str
) -> None:
    """SIGSTOP a holder, fail over, let another process take its key, resume it: refused.

    ``instant``: the frozen holder's advisory lock never reaches the new
    primary (its control connection died with the old one and cannot come
    back while it is frozen), so the taker needs only ``takeover_grace``.
    ``expiry``: without instant takeover the lease, as replicated, expires.
    """
    instant = takeover == "instant"
    lease = {"lock_duration": 4.0, "lock_refresh_interval": 0.5, "instant_takeover": instant}
    old = spawn(**OPTIONS, **lease, refuse_handoff=True)
    old.ok("load", key="k")
    old.ok("set", key="k", coins=1)
    old.ok("save", key="k")
    old.ok("set", key="k", coins=666)  # unsaved when it freezes: must never be written
    old_token = versions(pair, store_name)["k"][-1].token
    new = spawn(**OPTIONS, **lease, lock_timeout=10.0, takeover_grace=1.0)

    os.kill(old.pid, signal.SIGSTOP)
    try:
        old.send("save", key="k")  # the first thing it does once it runs again
        pair.fail_over()
        started = time.monotonic()
        new.ok("load", key="k")
        waited = time.monotonic() - started
        print(f"\nfailover: {takeover} takeover of a frozen holder's key took {waited:.2f} s")
        if instant:
            assert waited < 3.0, "waited for the lease to expire, not for the grace"
        assert new.ok("get", key="k") == {"coins": 1}
        new.ok("set", key="k", coins=50)
        new.ok("save", key="k")
    finally:
        os.kill(old.pid, signal.SIGCONT)

    answer = old.receive(timeout=RETRY + 10.0)
    assert answer["ok"] is False, f"the stale holder's save was accepted: {answer}"
    # Its overdue heartbeat and this save race; either learns the lease is gone.
    assert answer["error"] in ("LockLostError", "SessionClosedError"), answer
    poll(lambda: old.ok("lost") == ["k"], 10.0, "on_lock_lost in the stale holder")
    rows = versions(pair, store_name)["k"]
    assert [(r.version, r.holder) for r in rows] == [(1, old.holder), (2, new.holder)]
    assert rows[1].token > old_token
    reader = make_store({"coins": 0}, **OPTIONS)
    assert [reader.read_version("k", r.version)[0]["coins"] for r in rows] == [1, 50]
    assert_tokens_never_go_back(pair, store_name)


# -- 3. every store recovers by itself ----------------------------------------------------


def alive(pair: Pair, holder: str) -> bool:
    """Does ``holder`` hold its advisory lock (proof of life) on the current primary?"""
    query = "SELECT {s}.holder_alive(CAST(:holder AS uuid))"
    return bool(on_primary(pair, query, holder=holder)[0][0])


def timed(call: Callable[[], object]) -> tuple[threading.Thread, list[Any]]:
    """Run ``call`` on a thread; the list gets (monotonic end time, result or exception)."""
    outcome: list[Any] = []

    def run() -> None:
        try:
            result: object = call()
        except BaseException as exc:
            result = exc
        outcome.append((time.monotonic(), result))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


def test_every_store_recovers_by_itself_with_its_control_connection(
    pair: Pair, spawn: Spawn, make_store: MakeStore, caplog: pytest.LogCaptureFixture
) -> None:
    """Durable updates sent while there is no primary succeed once it is back, without a restart.

    Then each store's control connection is on the new primary: its advisory
    lock is there (liveness) and it hears handoff requests (LISTEN): with a
    30 s grace and leases renewed, only a live handoff gives the key to
    another process within its 3 s ``lock_timeout``.
    """
    patient = {**OPTIONS, "takeover_grace": 30.0, "lock_timeout": 3.0}
    children = [spawn(**patient) for _ in range(2)]
    mine = make_store({"coins": 0}, **patient)
    for i, child in enumerate(children):
        child.ok("load", key=f"c{i}")
    mine.load("m")
    stores = {f"child {i}": child.holder for i, child in enumerate(children)}
    stores["in-process"] = mine.holder

    caplog.set_level(logging.WARNING, logger="sessionstore")
    killed_at = pair.kill_primary()
    calls = [
        timed(functools.partial(child.ok, "add", key=f"c{i}", coins=1, durable=True))
        for i, child in enumerate(children)
    ]
    calls.append(timed(lambda: mine.update("m", lambda d: d.update(coins=1) or True, durable=True)))

    def retrying() -> bool:
        mine_retries = any(
            RETRYING in r.getMessage() and getattr(r, "holder", None) == mine.holder
            for r in caplog.records
        )
        return mine_retries and all(RETRYING in child.errors() for child in children)

    poll(retrying, 10.0, "every store to be retrying its save against the dead primary")
    promoted_at = pair.promote()
    print(
        f"\nfailover: promotion asked {promoted_at - killed_at:.2f} s after the kill, "
        f"pg_ctl promote -w took {pair.promote_took:.2f} s"
    )
    for (name, _), (thread, outcome) in zip(stores.items(), calls, strict=True):
        thread.join(RETRY + 10.0)
        ended, result = outcome[0]
        assert result is True, f"{name}: {result!r}"
        assert ended - promoted_at < RETRY
        print(f"failover: {name}: first durable save {ended - promoted_at:.3f} s after promote")
    for name, holder in stores.items():
        poll(functools.partial(alive, pair, holder), 2.0, f"{name}'s advisory lock, new primary")
        print(f"failover: {name}: advisory lock seen {time.monotonic() - promoted_at:.3f} s after")

    check_handoffs(make_store({"coins": 0}, **patient), mine, children)


def check_handoffs(asker: ss.Store, mine: ss.Store, children: list[Child]) -> None:
    """Each store that went through the failover hands a key over when asked (LISTEN is back)."""
    for key, taker in [("c0", asker), ("m", asker), ("c1", mine)]:
        started = time.monotonic()
        taker.load(key)  # LockUnavailableError after lock_timeout if the holder never hears
        print(f"failover: handoff of {key!r}, new primary: {time.monotonic() - started:.3f} s")
    assert mine.get("c1") == {"coins": 1}
    assert asker.get("c0") == {"coins": 1} and asker.get("m") == {"coins": 1}
    poll(lambda: children[0].ok("lost") == ["c0"], 5.0, "child 0 to see its key handed over")
    poll(lambda: children[1].ok("lost") == ["c1"], 5.0, "child 1 to see its key handed over")


# -- 4. fencing tokens ----------------------------------------------------------------------


def test_fencing_tokens_keep_growing_across_the_promotion(
    pair: Pair, make_store: MakeStore, store_name: str
) -> None:
    """One grant after another on one thread, the primary killed among them: tokens only grow.

    PostgreSQL WAL-logs a sequence 32 values ahead of what it hands out; a
    promoted standby resumes from the last logged value. More than 32 grants
    before the kill cross such a boundary at least once.
    """
    store = make_store({"coins": 0}, **OPTIONS)
    granted: list[str] = []
    stop = threading.Event()

    def grants() -> None:
        turn = 0
        while not stop.is_set():
            key = f"t{turn:04d}"
            store.load(key)
            store.update(key, lambda d: d.update(coins=1) or True, durable=True)
            store.unload(key)
            granted.append(key)
            turn += 1

    thread, outcome = timed(grants)
    poll(lambda: len(granted) >= 40, 30.0, "40 grants before the kill")
    before = len(granted)  # acknowledged before the kill
    pair.fail_over()
    poll(lambda: len(granted) >= before + 40 or outcome, RETRY + 10.0, "40 grants after it")
    stop.set()
    thread.join(RETRY + 5.0)
    assert outcome and outcome[0][1] is None, outcome

    rows = on_primary(
        pair,
        "SELECT key, token FROM {s}.versions WHERE store = :store ORDER BY created_at, key",
        store=store_name,
    )
    assert [r.key for r in rows] == granted  # one version per grant, in grant order
    tokens = [r.token for r in rows]
    assert all(a < b for a, b in itertools.pairwise(tokens)), f"tokens went back: {tokens}"
    last_value = on_primary(pair, "SELECT last_value FROM {s}.lease_tokens")[0][0]
    assert last_value >= tokens[-1]
    print(
        f"\nfailover: {len(tokens)} grants, tokens {tokens[0]}..{tokens[-1]} strictly growing; "
        f"last before the kill {tokens[before - 1]}, next ones {tokens[before : before + 3]}"
    )


def test_a_dead_primary_that_does_not_answer_costs_one_connect_timeout(
    pair: Pair, spawn: Spawn, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The dead primary's address takes connections and never answers (its machine is down).

    Each connection attempt waits the DSN's ``connect_timeout`` on it before
    it tries the promoted standby; so must the control connection (it used a
    fixed 10 s, and the holder looked dead on the new primary for that long,
    past ``takeover_grace``). The holder is frozen from before the kill until
    after the promotion, so that every attempt it makes meets the dead
    address (listed first: a dead host after the live one costs nothing):
    its control connection is back within about one timeout.
    """
    monkeypatch.setenv(RESOLVED_ENV, pair.dsn_starting_with(pair.primary))
    child = spawn(**OPTIONS)
    child.ok("load", key="k")
    dead = pair.primary.port
    os.kill(child.pid, signal.SIGSTOP)
    try:
        child.send("add", key="k", coins=1, durable=True)  # read once it runs again
        pair.kill_primary()
        with black_hole(dead):
            pair.promote()
            resumed_at = time.monotonic()
            os.kill(child.pid, signal.SIGCONT)
            assert child.receive(timeout=RETRY + 10.0) == {"ok": True, "result": True}
            saved = time.monotonic() - resumed_at
            assert saved < RETRY
            poll(
                lambda: alive(pair, child.holder),
                2 * CONNECT_TIMEOUT + 1.5,
                "the advisory lock on the new primary",
            )
            back = time.monotonic() - resumed_at
    finally:
        os.kill(child.pid, signal.SIGCONT)
    print(
        f"\nfailover, dead primary not answering: first durable save {saved:.2f} s, "
        f"advisory lock back {back:.2f} s after the holder ran again"
    )


# -- 5. what an asynchronous standby loses -------------------------------------------------


def applied_ids(pair: Pair, store: str, key: str) -> set[str]:
    """The idempotency keys stored for ``key`` on the current primary."""
    found = on_primary(
        pair,
        "SELECT request_id FROM {s}.applied_requests WHERE store = :store AND key = :key",
        store=store,
        key=key,
    )
    return {row.request_id for row in found}


def test_an_asynchronous_standby_loses_the_lag_window_but_the_fence_holds(
    pair: Pair, spawn: Spawn, make_store: MakeStore, store_name: str
) -> None:
    """What docs/scaling.md says asynchronous replication can lose, shown.

    The standby is made asynchronous and its walsender frozen, so all that
    is acknowledged from then on exists on the primary alone, and dies with
    it: a durable update, 41 lease grants (more than the 32 values a
    sequence is WAL-logged ahead) and a key's first save. After the
    promotion: that durable update's idempotency key is gone though the
    holder, which kept its lease, writes its effect again (version 2 is
    missing); token values are handed out again; a version number is
    reused; and still the holder of a lost grant cannot write.
    """
    kept = spawn(**OPTIONS, lock_duration=15.0, refuse_handoff=True)
    other = spawn(**OPTIONS, lock_duration=15.0)
    pair.set_synchronous(False)
    kept.ok("load", key="kept")
    assert kept.ok("add", key="kept", coins=1, durable=True, rid="r1") is True
    pair.wait_replayed()
    pair.freeze_replication()
    assert kept.ok("add", key="kept", coins=1, durable=True, rid="r2") is True
    for i in range(40):
        other.ok("load", key=f"g{i}")
        other.ok("unload", key=f"g{i}")
    other.ok("load", key="stale")
    assert other.ok("add", key="stale", coins=5, durable=True, rid="r3") is True
    handed_out = on_primary(pair, "SELECT last_value FROM {s}.lease_tokens")[0][0]
    replicated = on_standby(pair, "SELECT last_value FROM {s}.lease_tokens")[0][0]
    pair.fail_over()

    assert applied_ids(pair, store_name, "kept") == {"r1"}, "acknowledged r2 should be lost"
    assert "stale" not in versions(pair, store_name)
    fresh = make_store({"coins": 0}, **OPTIONS)
    fresh.load("stale")  # no lease row for it any more: free
    assert fresh.list_versions("stale") == []
    reused = on_primary(
        pair, "SELECT token FROM {s}.locks WHERE store = :store AND key = 'stale'", store=store_name
    )[0][0]
    print(
        f"\nfailover, asynchronous: tokens up to {handed_out} handed out, {replicated} "
        f"replicated; the promoted server's next grant got {reused}"
    )
    assert replicated < reused <= handed_out, "a token value should be handed out again"
    assert fresh.update("stale", lambda d: d.update(coins=7) or True, durable=True)

    # The lost grant's holder is fenced out (by holder and token, not token alone).
    other.ok("add", key="stale", coins=1)
    answer = other.call("save", key="stale")
    assert answer["ok"] is False, answer
    assert answer["error"] in ("LockLostError", "SessionClosedError"), answer
    stale = versions(pair, store_name)["stale"]
    assert [(r.version, r.holder) for r in stale] == [(1, fresh.holder)]
    assert fresh.read_version("stale", 1)[0] == {"coins": 7}  # version 1 again, other data

    check_the_holder_that_kept_its_lease(pair, kept, fresh, store_name)
    assert_tokens_never_go_back(pair, store_name)


def check_the_holder_that_kept_its_lease(
    pair: Pair, kept: Child, fresh: ss.Store, store_name: str
) -> None:
    """It writes its whole document again: r2's effect is back, its key is not, no version 2."""
    assert kept.ok("add", key="kept", coins=1, durable=True, rid="r4") is True
    assert [r.version for r in versions(pair, store_name)["kept"]] == [1, 3]
    assert applied_ids(pair, store_name, "kept") == {"r1", "r4"}
    kept.ok("unload", key="kept")
    fresh.load("kept")
    assert fresh.get("kept") == {"coins": 3}
    assert fresh.applied("kept", "r2") is False  # a retried r2 would be applied twice

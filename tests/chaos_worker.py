"""Child processes for the multi-process tests (test_takeover.py, test_chaos.py).

Run as ``python tests/chaos_worker.py MODE CONFIG_JSON``; the DSN comes from
``$SESSIONSTORE_TEST_DSN_RESOLVED`` unless CONFIG has ``dsn``.

``holder`` mode: a Store driven by JSON commands on stdin, one per line, each
answered by one JSON line on stdout (``{"ok": true, "result": ...}`` or
``{"ok": false, "error": "<exception class>", "message": ...}``). It lets a
test own a real holder process that it can ``kill -9``, SIGSTOP and so on.

``chaos`` mode: a worker of the chaos test. It loads random keys, increments
its own counter in them, moves coins between two of them in a ``tx``, saves,
unloads and exits at random, and appends to its log file (one JSON object per
line, flushed) what is acknowledged durable once a call returned. With
``fork`` in CONFIG it also ``os.fork()``s, as gunicorn ``--preload`` does: at
start (right after its Store was made) and now and then mid-life, it changes
a key, forks a short-lived child that works with the inherited Store as a
writer of its own (logged in the same file under its own worker id), waits
for it, then saves the key it changed before the fork.

A chaos worker also sends gifts (``send_message`` to a random key, the
gift's id unique in the run), which every worker's ``message_handler``
appends to ``data["gifts"]``, and applies purchase receipts to keys it holds
(``update(durable=True, idempotency_key=receipt id)``, appending the id to
``data["receipts"]`` and its amount to ``data["paid"]``). Each is logged
before the call (``gift_try``, ``receipt_try``: the target, in case the
process dies in the call) and after it: ``gift_sent`` / ``receipt_ack`` once
the call returned (durable), ``gift_maybe`` / ``receipt_maybe`` when it
raised. Now and then it applies again a receipt acknowledged before (it must
return False without running the transform, else ``receipt_bad``) or
retries one whose attempt raised or was cut short by a kill (True or False:
False means applied and durable, so both are acknowledgements).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import random
import signal
import sys
import threading
import time
import traceback
from typing import Any, NoReturn

CHAOS_TEMPLATE: dict[str, Any] = {"coins": 0, "inc": {}, "chk": {}}


def receipt_amount(rid: str) -> int:
    """What a receipt adds to ``data["paid"]``: written in its id (``<...>:<amount>``)."""
    return int(rid.rpartition(":")[2])


def apply_gift(key: str, data: dict[str, Any], message: Any) -> bool:
    """The chaos ``message_handler``: append the gift's id to ``data["gifts"]``.

    No de-duplication: a gift applied twice must show in the stored data.
    """
    data.setdefault("gifts", []).append(message["gift"])
    return True


def _skew_clock(seconds: float) -> None:
    """Make this process's wall clock wrong by ``seconds`` (before sessionstore is imported)."""
    real = time.time
    real_ns = time.time_ns
    time.time = lambda: real() + seconds  # type: ignore[assignment]
    time.time_ns = lambda: real_ns() + int(seconds * 1e9)  # type: ignore[assignment]


def _dsn(config: dict[str, Any]) -> str:
    return config.get("dsn") or os.environ["SESSIONSTORE_TEST_DSN_RESOLVED"]


# -- holder mode ----------------------------------------------------------------------


def holder_main(config: dict[str, Any]) -> None:
    if config.get("skew_seconds"):
        _skew_clock(float(config["skew_seconds"]))
    import sessionstore as ss
    from sessionstore import db

    lost: list[str] = []
    requests: list[str] = []

    def on_handoff_request(key: str) -> bool:
        requests.append(key)
        return not config.get("refuse_handoff", False)

    engine = db.create_engine(_dsn(config), application_name=config.get("app", "sessionstore"))
    store = ss.Store(
        config["name"],
        template=config.get("template", {"coins": 0}),
        dsn=engine,
        db_schema=config["schema"],
        on_lock_lost=lost.append,
        on_handoff_request=on_handoff_request,
        **config.get("options", {}),
    )

    def run(command: dict[str, Any]) -> Any:
        op = command["op"]
        key = command.get("key")
        if op == "info":
            return {"holder": store.holder, "pid": os.getpid(), "time": time.time()}
        if op == "load":
            store.load(key)
            return None
        if op == "set":

            def change(data: dict[str, Any]) -> bool:
                data[command["field"]] = command["value"]
                return True

            return store.update(key, change)
        if op == "get":
            return store.get(key)
        if op == "save":
            store.save(key)
            return None
        if op == "set_save":
            # One command, so nothing the parent does can come in between.
            store.update(key, lambda d: d.update({command["field"]: command["value"]}) or True)
            store.save(key)
            return None
        if op == "unload":
            store.unload(key)
            return None
        if op == "events":
            return {"lost": list(lost), "requests": list(requests)}
        if op == "close":
            store.close()
            return None
        raise ValueError(f"unknown op {op!r}")

    for line in sys.stdin:
        if not line.strip():
            continue
        command = json.loads(line)
        try:
            answer = {"ok": True, "result": run(command)}
        except Exception as exc:
            answer = {"ok": False, "error": type(exc).__name__, "message": str(exc)}
        sys.stdout.write(json.dumps(answer, default=str) + "\n")
        sys.stdout.flush()
        if command["op"] == "close":
            break
    os._exit(0)


# -- stall mode: save in a tight loop, report every outcome ------------------------------


def stall_main(config: dict[str, Any]) -> None:
    """Load one key, then set ``n`` = 1, 2, 3... and save, printing each outcome.

    The parent SIGSTOPs this loop past the lease, lets another holder take the
    key, and SIGCONTs it: every save after that must fail and write nothing.
    """
    import sessionstore as ss
    from sessionstore import db

    engine = db.create_engine(_dsn(config), application_name=config.get("app", "sessionstore"))
    store = ss.Store(
        config["name"],
        template={"n": 0, "by": None},
        dsn=engine,
        db_schema=config["schema"],
        **config.get("options", {}),
    )
    key = config["key"]
    store.load(key)
    n = 0
    print(json.dumps({"ready": True, "holder": store.holder}), flush=True)
    deadline = time.monotonic() + float(config.get("seconds", 60))
    while time.monotonic() < deadline:
        n += 1
        value = n
        try:
            store.update(key, lambda d, value=value: d.update(n=value, by="stalled") or True)
            store.save(key)
        except Exception as exc:
            print(json.dumps({"n": value, "ok": False, "error": type(exc).__name__}), flush=True)
            break
        print(json.dumps({"n": value, "ok": True}), flush=True)
        time.sleep(0.002)
    os._exit(0)


# -- chaos mode ------------------------------------------------------------------------

FORK_BUDGET = (0.6, 1.5)
"""Seconds a forked child starts new work for (then it finishes what it holds and exits)."""

FORK_WAIT = 20.0
"""How long a parent waits for its forked child before it kills it (a hang: the test fails)."""


class _ChildExit(BaseException):
    """Raised in a forked child when its work is done: unwinds to :func:`chaos_main`.

    A BaseException, so that no handler of the worker's loop takes it: the child
    never goes back into the loop it was forked from.
    """

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


class _Errors(logging.Handler):
    """Keeps the sessionstore errors a forked child logs (its exit included)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


class _ToLog(logging.Handler):
    """The library's INFO and above (lost leases, handoffs, retries) as ``lib`` events."""

    def __init__(self, worker: ChaosWorker) -> None:
        super().__init__(logging.INFO)
        self.worker = worker

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(Exception):
            self.worker.emit(
                "lib",
                level=record.levelname,
                msg=record.getMessage(),
                holder=getattr(record, "holder", None),
                thread=record.threadName,
            )


_child_exit: dict[str, Any] | None = None
"""Set in a forked child: what its atexit record says (see :func:`_log_child_exit`)."""


def _log_child_exit() -> None:
    """atexit, registered before any Store: runs after sessionstore closed its Stores."""
    info = _child_exit
    if info is None or info["pid"] != os.getpid():
        return
    errors: _Errors = info["errors"]
    with open(info["log"], "a") as log:
        log.write(
            json.dumps(
                {
                    "event": "fork_exit",
                    "w": info["w"],
                    "pid": os.getpid(),
                    "seconds": round(time.monotonic() - info["started"], 3),
                    "at": time.time(),
                    "began": info["forked_at"],
                    "errors": errors.lines,
                }
            )
            + "\n"
        )


def pid_alive(pid: int) -> bool:
    """Is ``pid`` a running (not zombie) process? It need not be our child."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            state = stat.read().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


HOLDER_LOCK_SQL = (
    "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted AND objsubid = 2 "
    "AND classid = (hashtext('sessionstore.holder')::bigint & 4294967295)::oid "
    "AND objid = (hashtext(%s)::bigint & 4294967295)::oid"
)
"""Backends holding a holder's proof-of-life advisory lock (its control connection)."""


class ChaosWorker:
    def __init__(self, config: dict[str, Any]) -> None:
        import sessionstore as ss
        from sessionstore import db

        self.ss = ss
        self.wid = str(config["worker"])
        self.keys: list[str] = list(config["keys"])
        self.seed = config["seed"]
        self.rng = random.Random(self.seed)
        self.stop_file = config["stop_file"]
        self.log_path = config["log"]
        self.log = open(self.log_path, "a", buffering=1)  # noqa: SIM115 - lives as long as we do
        # Re-entrant: held across os.fork(), and the library may log in the child's at-fork hook.
        self.log_lock = threading.RLock()
        library = logging.getLogger("sessionstore")
        library.setLevel(logging.INFO)
        library.addHandler(_ToLog(self))
        self.dsn = _dsn(config)
        self.app = config["app"]
        self.incarnation = int(config.get("incarnation", 0))
        self.forking = bool(config.get("fork", False))
        self.forks = 0
        self.child = False  # a forked child (it must leave through atexit)
        # Keys another process may not have for now (the key changed before a fork
        # stays ours until the parent saved it after the child exited).
        self.guarded: set[str] = set()
        self.gifts = 0  # gifts and receipts made by this process (their ids' sequence)
        self.receipts = 0
        # Receipt id -> key: acknowledged, and tried without an acknowledgement, by any
        # incarnation of this worker or its children (from the log: kill -9 included).
        self.acked_receipts: dict[str, str] = {}
        self.unsure_receipts: dict[str, str] = {}
        self.read_receipts()
        engine = db.create_engine(_dsn(config), application_name=self.app, pool_size=4)
        self.store = ss.Store(
            config["name"],
            template=CHAOS_TEMPLATE,
            dsn=engine,
            db_schema=config["schema"],
            on_handoff_request=self.may_hand_over,
            message_handler=self.on_message,
            **config["options"],
        )
        self.held: set[str] = set()
        self.emit("start", holder=self.store.holder, pid=os.getpid())
        # Expected outcomes under faults: the key is gone, or the database is down.
        self.expected = (
            ss.SessionClosedError,
            ss.LockLostError,
            ss.KeyNotLoadedError,
            ss.LockUnavailableError,
            ss.StorageUnavailableError,
        )

    def may_hand_over(self, key: str) -> bool:
        return key not in self.guarded

    def read_receipts(self) -> None:
        """The receipts earlier incarnations (and their children) acknowledged or left unsure."""
        tried: dict[str, str] = {}
        with contextlib.suppress(FileNotFoundError), open(self.log_path) as log:
            for line in log:
                try:
                    e = json.loads(line)
                except ValueError:
                    continue
                if e["event"] == "receipt_try":
                    tried[e["rid"]] = e["key"]
                elif e["event"] == "receipt_ack":
                    self.acked_receipts[e["rid"]] = e["key"]
        self.unsure_receipts = {
            rid: key for rid, key in tried.items() if rid not in self.acked_receipts
        }

    # -- gifts (messages) and receipts (idempotency keys) ------------------------------

    def on_message(self, key: str, data: dict[str, Any], message: Any) -> bool:
        """The ``message_handler``: in memory only (the save that carries it deletes the row)."""
        applied = apply_gift(key, data, message)
        self.emit("gift_applied", key=key, gift=message["gift"], pid=os.getpid())
        return applied

    def send_gift(self) -> None:
        """Send a gift to a random key; ``gift_sent`` once send_message returned (durable)."""
        self.gifts += 1
        gift = f"g{self.wid}:{self.incarnation}:{self.gifts}"
        key = self.rng.choice(self.keys)
        self.emit("gift_try", key=key, gift=gift)
        try:
            mid = self.store.send_message(key, {"gift": gift})
        except self.ss.MessageQueueFullError:
            self.emit("gift_refused", key=key, gift=gift)
            return
        except self.expected as exc:
            self.emit("gift_maybe", key=key, gift=gift, error=type(exc).__name__)
            raise
        self.emit("gift_sent", key=key, gift=gift, id=mid)
        if key in self.held and not self.child and not self.guarded and self.rng.random() < 0.1:
            self.die_with_gift(key, gift)

    def die_with_gift(self, key: str, gift: str) -> None:
        """Exit abruptly once our handler applied ``gift`` to ``key`` and before it is saved.

        Its message row stays (only the write carrying the gift deletes it):
        the key's next holder must apply it again, to the data as last saved.
        """
        deadline = time.monotonic() + 0.5
        while time.monotonic() < deadline:
            if gift in self.store.get(key).get("gifts", ()):
                if not self.store.is_saved(key):
                    self.emit("exit", how="abrupt-after-gift", key=key, gift=gift)
                    os._exit(0)
                return
            time.sleep(0.002)

    def receipt(self, key: str) -> None:
        """Apply a receipt to a held key: a new one, an acknowledged one again, or a retry."""
        rng = self.rng
        roll = rng.random()
        again = sorted(rid for rid, k in self.acked_receipts.items() if k == key)
        unsure = sorted(rid for rid, k in self.unsure_receipts.items() if k == key)
        if unsure and roll < 0.5:
            self.apply_receipt(key, rng.choice(unsure), "retry")
        elif again and roll < 0.7:
            self.apply_receipt(key, rng.choice(again), "repeat")
        else:
            self.receipts += 1
            rid = f"r{self.wid}:{self.incarnation}:{self.receipts}:{rng.randint(1, 99)}"
            self.apply_receipt(key, rid, "new")

    def apply_receipt(self, key: str, rid: str, mode: str) -> None:
        """``update(durable=True, idempotency_key=rid)``, its outcome logged.

        ``new``: must return True. ``repeat`` (acknowledged before): must return
        False without running the transform. ``retry`` (an attempt raised or was
        killed): True or False, both durable on return.
        """
        amount = receipt_amount(rid)
        calls = 0

        def pay(data: dict[str, Any]) -> bool:
            nonlocal calls
            calls += 1
            data.setdefault("receipts", []).append(rid)
            data["paid"] = int(data.get("paid", 0)) + amount
            return True

        self.emit("receipt_try", key=key, rid=rid, mode=mode)
        if mode != "repeat":
            self.unsure_receipts[rid] = key  # until acknowledged
        try:
            applied = self.store.update(key, pay, durable=True, idempotency_key=rid)
        except self.expected as exc:
            if mode == "repeat" and calls:
                self.emit("receipt_bad", key=key, rid=rid, why="a repeat ran the transform")
            elif mode != "repeat":
                self.emit("receipt_maybe", key=key, rid=rid, error=type(exc).__name__)
            raise
        if mode == "repeat":
            if applied or calls:
                why = f"a repeat of an acknowledged receipt returned {applied} ({calls} calls)"
                self.emit("receipt_bad", key=key, rid=rid, why=why)
            else:
                self.emit("receipt_repeat", key=key, rid=rid)
            return
        if mode == "new" and not applied:
            self.emit("receipt_bad", key=key, rid=rid, why="a new receipt returned False")
        via = mode if applied else f"{mode}-false"
        self.emit("receipt_ack", key=key, rid=rid, via=via, calls=calls)
        self.unsure_receipts.pop(rid, None)
        self.acked_receipts[rid] = key

    def emit(self, event: str, **fields: Any) -> None:
        line = json.dumps({"event": event, "w": self.wid, "t": round(time.time(), 4), **fields})
        with self.log_lock:
            self.log.write(line + "\n")

    def ack(self, key: str, n: int, via: str) -> None:
        """``key`` now durably carries our counter ``n`` (a call that saved it returned)."""
        self.emit("ack", key=key, n=n, via=via)

    def counter(self, key: str) -> int:
        return int(self.store.get(key)["inc"].get(self.wid, 0))

    def bump(self, data: dict[str, Any]) -> bool:
        """The increment transform: our counter's next id, added to our checksum."""
        n = int(data["inc"].get(self.wid, 0)) + 1  # this increment's id
        data["inc"][self.wid] = n
        data["chk"][self.wid] = int(data["chk"].get(self.wid, 0)) + n
        return True

    def increment(self, key: str) -> None:
        self.store.update(key, self.bump)

    def transfer(self, source: str, target: str, amount: int) -> None:
        seen: dict[str, int] = {}

        def fn(docs: dict[str, Any]) -> bool:
            docs[source]["coins"] -= amount
            docs[target]["coins"] += amount
            for k, doc in docs.items():
                seen[k] = int(doc["inc"].get(self.wid, 0))
            return True

        if self.store.tx([source, target], fn):
            for k, n in seen.items():
                self.ack(k, n, "tx")

    def step(self) -> None:
        rng = self.rng
        held = sorted(self.held)
        extra = rng.random()
        if extra < 0.06:
            self.send_gift()
            return
        if extra < 0.14 and held:
            self.receipt(rng.choice(held))
            return
        roll = rng.random()
        if roll < 0.25 and len(held) < 3:
            key = rng.choice([k for k in self.keys if k not in self.held])
            self.store.load(key)
            self.held.add(key)
        elif roll < 0.55 and held:
            self.increment(rng.choice(held))
        elif roll < 0.68 and len(held) >= 2:
            source, target = rng.sample(held, 2)
            self.transfer(source, target, rng.randint(1, 9))
        elif roll < 0.83 and held:
            key = rng.choice(held)
            n = self.counter(key)
            self.store.save(key)
            self.ack(key, n, "save")
        elif roll < 0.95 and held:
            key = rng.choice(held)
            n = self.counter(key)
            self.held.discard(key)
            self.store.unload(key)
            self.ack(key, n, "unload")
        elif self.forking and roll < 0.957:  # the forking worker, now and then mid-life
            self.fork()
        elif roll >= 0.996:  # rare: exit (cleanly or not) and be restarted
            if rng.random() < 0.5:
                self.emit("exit", how="close")
                with contextlib.suppress(self.ss.StoreCloseError):
                    self.store.close()
            else:
                self.emit("exit", how="abrupt")
            os._exit(0)

    # -- fork: the parent side --------------------------------------------------------

    def fork(self) -> None:
        """Change a key, fork a child that works with the inherited Store, then save the key.

        As under gunicorn ``--preload``: the Store was made before the fork, so
        in the child it must act as a fresh Store (own holder, no keys). The
        child's writes are its own writer's (``<wid>f<incarnation>.<n>``), so
        the checker holds them to the same invariants. The key changed before
        the fork is refused to other processes until the parent saved it: its
        save must then succeed unless a fault hit this worker meanwhile (the
        checker knows the faults' times).
        """
        rng = self.rng
        if self.held and rng.random() < 0.5:
            key = rng.choice(sorted(self.held))
        else:
            key = rng.choice([k for k in self.keys if k not in self.held])
            self.store.load(key)
            self.held.add(key)
        self.increment(key)
        n = self.counter(key)
        self.guarded.add(key)
        try:
            orphans = self.wait_for_orphans()
            t0 = time.time()
            before = self.connections()
            self.forks += 1
            child = f"{self.wid}f{self.incarnation}.{self.forks}"
            parent_holder, parent_pid = self.store.holder, os.getpid()
            with self.log_lock:  # no thread is half-way through a line of ours
                self.log.flush()
                sys.stdout.flush()
                sys.stderr.flush()
                pid = os.fork()
            if pid == 0:
                self.child_main(child, parent_holder, parent_pid, key)  # never returns
            self.emit("fork", child=child, pid=pid, key=key, orphans_alive=orphans, at=time.time())
            code, killed, waited = self.wait_child(pid)
            self.emit(
                "fork_wait",
                child=child,
                pid=pid,
                code=code,
                killed=killed,
                seconds=waited,
                at=time.time(),
            )
            after = self.connections()
            outcome: dict[str, Any] = {"key": key, "child": child, "t0": t0}
            if before is not None and after is not None and not orphans:
                outcome["control_kept"] = before[1] == after[1] and before[1] is not None
                outcome["pool_lost"] = sorted(before[0] - after[0])
            try:
                self.store.save(key)
            except self.expected as exc:
                failed = type(exc).__name__
                self.emit("fork_saved", ok=False, error=failed, t1=time.time(), **outcome)
                raise
            self.ack(key, n, "fork-save")
            self.emit("fork_saved", ok=True, t1=time.time(), **outcome)
        finally:
            self.guarded.discard(key)

    def wait_child(self, pid: int) -> tuple[int, bool, float]:
        """Wait for the child with a deadline, SIGKILL past it: (exit code, killed, seconds)."""
        started = time.monotonic()
        killed = False
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() - started > FORK_WAIT:
                os.kill(pid, signal.SIGKILL)
                _, status = os.waitpid(pid, 0)
                killed = True
                break
            time.sleep(0.01)
        return os.waitstatus_to_exitcode(status), killed, round(time.monotonic() - started, 3)

    def wait_for_orphans(self, timeout: float = 10.0) -> int:
        """Wait for children of our earlier incarnations still running (their parent was killed).

        They share our application_name, so the connection check needs them
        gone: not only past their ``fork_exit`` record (written at exit, while
        the interpreter still has its connections open) but ended. Returns how
        many were still alive after ``timeout``.
        """
        events = []
        with open(self.log_path) as log:
            for line in log:
                with contextlib.suppress(ValueError):
                    events.append(json.loads(line))
        waited = {e["child"] for e in events if e["event"] == "fork_wait"}
        ours = f"{self.wid}f"
        orphans = {e["child"]: e["pid"] for e in events if e["event"] == "fork"}
        orphans.update({e["w"]: e["pid"] for e in events if e["event"] == "fork_start"})
        pids = [
            pid for child, pid in orphans.items() if child.startswith(ours) and child not in waited
        ]
        deadline = time.monotonic() + timeout
        while True:
            alive = [pid for pid in pids if pid_alive(pid)]
            if not alive or time.monotonic() > deadline:
                return len(alive)
            time.sleep(0.05)

    def connections(self) -> tuple[set[int], int | None] | None:
        """This worker's backends: (pooled, by application_name; control, by advisory lock)."""
        import psycopg

        try:
            with psycopg.connect(
                self.dsn,
                autocommit=True,
                connect_timeout=3,
                application_name=f"{self.app}-observer",
            ) as conn:
                pooled = {
                    row[0]
                    for row in conn.execute(
                        "SELECT pid FROM pg_stat_activity WHERE application_name = %s",
                        (self.app,),
                    )
                }
                row = conn.execute(HOLDER_LOCK_SQL, (self.store.holder,)).fetchone()
        except psycopg.Error:
            return None  # the database is restarting, or this worker's connections were cut
        return pooled, (row[0] if row else None)

    # -- fork: the child side ---------------------------------------------------------

    def child_main(self, child: str, parent_holder: str, parent_pid: int, avoid: str) -> NoReturn:
        """The forked child: work with the inherited Store, then leave through a normal exit."""
        global _child_exit
        code = 3
        try:
            errors = _Errors()
            logging.getLogger("sessionstore").addHandler(errors)
            _child_exit = {
                "pid": os.getpid(),
                "w": child,
                "log": self.log_path,
                "started": time.monotonic(),
                "forked_at": time.time(),
                "errors": errors,
            }
            self.wid = child
            self.child = True
            self.held = set()
            self.gifts = self.receipts = 0  # the ids carry the child's own worker id
            self.rng = random.Random(f"{self.seed}:{child}")
            self.child_work(parent_holder, parent_pid, avoid)
            code = 0
        except BaseException:
            self.emit("crash", tb=traceback.format_exc())
        raise _ChildExit(code)

    def child_work(self, parent_holder: str, parent_pid: int, avoid: str) -> None:
        started = time.monotonic()
        deadline = started + self.rng.uniform(*FORK_BUDGET)
        holder: str | None = None
        while holder is None:
            try:
                holder = self.store.holder  # opens the child's own core
            except self.expected as exc:
                self.emit("expected", error=type(exc).__name__)
                if time.monotonic() > deadline:
                    return
                time.sleep(0.1)
        try:
            self.store.get(avoid)  # the parent's loaded key: not ours
            inherited = True
        except self.ss.KeyNotLoadedError:
            inherited = False
        self.emit(
            "fork_start",
            holder=holder,
            pid=os.getpid(),
            parent_holder=parent_holder,
            parent_pid=parent_pid,
            inherited_visible=inherited,
            at=time.time(),
        )
        keys = [k for k in self.keys if k != avoid]
        while time.monotonic() < deadline:
            try:
                self.child_step(keys)
            except self.expected as exc:
                self.emit("expected", error=type(exc).__name__)
            time.sleep(self.rng.random() * 0.01)
        self.emit("fork_done", seconds=round(time.monotonic() - started, 3))

    def child_step(self, keys: list[str]) -> None:
        """One unit of the child's work; what it acknowledges was saved by a call that returned."""
        rng = self.rng
        roll = rng.random()
        if roll < 0.1:
            self.send_gift()
        elif roll < 0.35:
            source, target = rng.sample(keys, 2)
            with self.store.session(source), self.store.session(target):
                self.increment(source)
                self.transfer(source, target, rng.randint(1, 9))
                counters = {source: self.counter(source), target: self.counter(target)}
            for key, n in counters.items():
                self.ack(key, n, "child-sessions")
        else:
            key = rng.choice(keys)
            with self.store.session(key) as s:
                for _ in range(rng.randint(1, 3)):
                    s.update(self.bump)
                n = int(s.get()["inc"].get(self.wid, 0))
                if rng.random() < 0.3:
                    self.receipt(key)
            self.ack(key, n, "child-session")

    # -- the loop -----------------------------------------------------------------------

    def run(self) -> None:
        fork_first = self.forking  # as under --preload: fork right after the Store was made
        while not os.path.exists(self.stop_file):
            try:
                if fork_first:
                    fork_first = False
                    self.fork()
                else:
                    self.step()
            except self.expected as exc:
                self.emit("expected", error=type(exc).__name__)
                # Forget keys whose session is gone; load() reloads them later.
                for key in list(self.held):
                    try:
                        self.store.get(key)
                    except (self.ss.SessionClosedError, self.ss.KeyNotLoadedError):
                        self.held.discard(key)
            time.sleep(self.rng.random() * 0.01)
        # Told to stop: unload what we hold (each unload that returns is acknowledged).
        for key in sorted(self.held):
            try:
                n = self.counter(key)
                self.store.unload(key)
                self.ack(key, n, "stop-unload")
            except self.expected:
                pass
        with contextlib.suppress(self.ss.StoreCloseError):
            self.store.close()
        self.emit("stopped")


def chaos_main(config: dict[str, Any]) -> None:
    # Before any Store: atexit runs this after sessionstore's own handler (LIFO).
    atexit.register(_log_child_exit)
    child_code: int | None = None
    try:
        # Starting may meet the database mid-restart: keep trying for a while.
        deadline = time.monotonic() + 30.0
        while True:
            try:
                worker = ChaosWorker(config)
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        worker.run()
    except _ChildExit as done:
        child_code = done.code
    except BaseException:
        with open(config["log"], "a") as log:
            log.write(
                json.dumps(
                    {"event": "crash", "w": str(config["worker"]), "tb": traceback.format_exc()}
                )
                + "\n"
            )
        os._exit(3)
    if child_code is not None:
        # A forked child leaves as a program does: SystemExit, then the atexit
        # handlers (sessionstore closes its Stores there, then _log_child_exit).
        sys.exit(child_code)
    os._exit(0)


# -- parent side ------------------------------------------------------------------------

WORKER = __file__


class Child:
    """A ``holder``/``stall`` child process, driven line by line from a test."""

    def __init__(self, mode: str, config: dict[str, Any]) -> None:
        import queue
        import subprocess
        import threading

        self.proc = subprocess.Popen(
            [sys.executable, WORKER, mode, json.dumps(config)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        self.pid = self.proc.pid
        self.lines: queue.Queue[str | None] = queue.Queue()

        def pump() -> None:
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                self.lines.put(line)
            self.lines.put(None)

        threading.Thread(target=pump, daemon=True).start()

    def read(self, timeout: float = 30.0) -> dict[str, Any]:
        import queue

        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"child {self.pid} said nothing for {timeout}s") from None
        if line is None:
            raise AssertionError(f"child {self.pid} exited ({self.proc.wait()})")
        result: dict[str, Any] = json.loads(line)
        return result

    def send(self, op: str, timeout: float = 30.0, **fields: Any) -> dict[str, Any]:
        """Send a command and return the whole answer (``ok``, ``result`` or ``error``)."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"op": op, **fields}) + "\n")
        self.proc.stdin.flush()
        return self.read(timeout)

    def call(self, op: str, timeout: float = 30.0, **fields: Any) -> Any:
        """Send a command that must succeed; its result."""
        answer = self.send(op, timeout, **fields)
        assert answer["ok"], f"child {op} failed: {answer}"
        return answer["result"]

    def signal(self, signum: int) -> None:
        os.kill(self.pid, signum)

    def kill(self) -> None:
        import signal

        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGCONT)
            os.kill(self.pid, signal.SIGKILL)
        self.proc.wait(10)


if __name__ == "__main__":
    mode, raw = sys.argv[1], sys.argv[2]
    {"holder": holder_main, "stall": stall_main, "chaos": chaos_main}[mode](json.loads(raw))

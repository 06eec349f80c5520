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
line, flushed) what is acknowledged durable once a call returned.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import sys
import time
import traceback
from typing import Any

CHAOS_TEMPLATE: dict[str, Any] = {"coins": 0, "inc": {}, "chk": {}}


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


class ChaosWorker:
    def __init__(self, config: dict[str, Any]) -> None:
        import sessionstore as ss
        from sessionstore import db

        self.ss = ss
        self.wid = str(config["worker"])
        self.keys: list[str] = list(config["keys"])
        self.rng = random.Random(config["seed"])
        self.stop_file = config["stop_file"]
        self.log = open(config["log"], "a", buffering=1)  # noqa: SIM115 - lives as long as we do
        engine = db.create_engine(_dsn(config), application_name=config["app"], pool_size=4)
        self.store = ss.Store(
            config["name"],
            template=CHAOS_TEMPLATE,
            dsn=engine,
            db_schema=config["schema"],
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

    def emit(self, event: str, **fields: Any) -> None:
        self.log.write(json.dumps({"event": event, "w": self.wid, **fields}) + "\n")

    def ack(self, key: str, n: int) -> None:
        """``key`` now durably carries our counter ``n`` (a call that saved it returned)."""
        self.emit("ack", key=key, n=n)

    def counter(self, key: str) -> int:
        return int(self.store.get(key)["inc"].get(self.wid, 0))

    def increment(self, key: str) -> None:
        def fn(data: dict[str, Any]) -> bool:
            n = int(data["inc"].get(self.wid, 0)) + 1  # this increment's id
            data["inc"][self.wid] = n
            data["chk"][self.wid] = int(data["chk"].get(self.wid, 0)) + n
            return True

        self.store.update(key, fn)

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
                self.ack(k, n)

    def step(self) -> None:
        rng = self.rng
        roll = rng.random()
        held = sorted(self.held)
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
            self.ack(key, n)
        elif roll < 0.95 and held:
            key = rng.choice(held)
            n = self.counter(key)
            self.held.discard(key)
            self.store.unload(key)
            self.ack(key, n)
        elif roll >= 0.996:  # rare: exit (cleanly or not) and be restarted
            if rng.random() < 0.5:
                self.emit("exit", how="close")
                with contextlib.suppress(self.ss.StoreCloseError):
                    self.store.close()
            else:
                self.emit("exit", how="abrupt")
            os._exit(0)

    def run(self) -> None:
        while not os.path.exists(self.stop_file):
            try:
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
                self.ack(key, n)
            except self.expected:
                pass
        with contextlib.suppress(self.ss.StoreCloseError):
            self.store.close()
        self.emit("stopped")


def chaos_main(config: dict[str, Any]) -> None:
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
    except BaseException:
        with open(config["log"], "a") as log:
            log.write(
                json.dumps(
                    {"event": "crash", "w": str(config["worker"]), "tb": traceback.format_exc()}
                )
                + "\n"
            )
        os._exit(3)
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

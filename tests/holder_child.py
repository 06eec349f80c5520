"""A holder process for the multi-process tests, driven line by line.

:class:`Child` starts a Python process that builds a Store from the options
it is given and answers one JSON line per command on its stdin (load, set,
add, tx, save, unload, get, applied, send, handled, lost, close), so a test
decides exactly when it loads, changes, saves, and when it is killed or
frozen. The ``spawn`` fixture (conftest) makes them and stops them after the test.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
from typing import Any

CHILD = r"""
import json, os, sys
import sessionstore as ss

config = json.loads(sys.argv[1])
lost = []
options = dict(config["options"])
if options.pop("refuse_handoff", False):
    options["on_handoff_request"] = lambda key: False
handled = []
if options.pop("gift_handler", False):
    def take_gift(key, data, message):
        handled.append(message)
        if message.get("decline"):
            return False
        data.setdefault("gifts", []).append(message["gift"])
        return True
    options["message_handler"] = take_gift
store = ss.Store(
    name=config["name"],
    template={"coins": 0},
    dsn=options.pop("dsn", os.environ["SESSIONSTORE_TEST_DSN_RESOLVED"]),  # before **options
    db_schema=config["schema"],
    on_lock_lost=lost.append,
    **options,
)


def reply(message):
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def add_coins(value):
    def fn(data):
        data["coins"] += value
        return True
    return fn


def set_coins(value):
    def fn(data):
        data["coins"] = value
        return True
    return fn


def move_coins(value):
    def fn(data):
        first, second = sorted(data)
        data[first]["coins"] -= value
        data[second]["coins"] += value
        return True
    return fn


reply({"ok": True, "result": {"pid": os.getpid(), "holder": store.holder}})
while True:
    line = sys.stdin.readline()
    if not line:
        break
    command = json.loads(line)
    op, key = command["op"], command.get("key")
    try:
        if op == "load":
            result = store.load(key)
        elif op == "set":
            result = store.update(key, set_coins(command["coins"]))
        elif op == "save":
            result = store.save(key)
        elif op == "unload":
            result = store.unload(key)
        elif op == "get":
            result = ss.thaw(store.get(key))
        elif op == "add":
            result = store.update(
                key,
                add_coins(command["coins"]),
                durable=command.get("durable", False),
                idempotency_key=command.get("rid"),
            )
        elif op == "tx":
            result = store.tx(
                command["keys"], move_coins(command["coins"]), idempotency_key=command.get("rid")
            )
        elif op == "applied":
            result = store.applied(key, command["rid"])
        elif op == "send":
            result = store.send_message(key, command["message"])
        elif op == "handled":
            result = list(handled)
        elif op == "lost":
            result = list(lost)
        elif op == "close":
            store.close()
            reply({"ok": True, "result": None})
            break
        else:
            raise ValueError(f"unknown op {op!r}")
        reply({"ok": True, "result": result})
    except Exception as exc:
        reply({"ok": False, "error": type(exc).__name__, "message": str(exc)})
        if op == "close":
            break  # closed all the same (StoreCloseError: keys it could not save)
"""


class Child:
    """A holder process driven line by line."""

    def __init__(self, name: str, schema: str, **options: Any) -> None:
        self.stderr = tempfile.TemporaryFile()  # noqa: SIM115 - closed in stop()
        config = {"name": name, "schema": schema, "options": options}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, json.dumps(config)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            text=True,
            bufsize=1,
            env=os.environ.copy(),  # carries SESSIONSTORE_TEST_DSN_RESOLVED
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        hello = self.receive(timeout=60.0)
        assert hello["ok"], hello
        self.pid: int = hello["result"]["pid"]
        self.holder: str = hello["result"]["holder"]

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def errors(self) -> str:
        self.stderr.seek(0)
        return self.stderr.read().decode(errors="replace")[-4000:]

    def send(self, op: str, **args: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"op": op, **args}) + "\n")
        self.proc.stdin.flush()

    def receive(self, timeout: float = 20.0) -> dict[str, Any]:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(
                f"child {self.proc.pid} did not answer:\n{self.errors()}"
            ) from None
        if line is None:
            raise AssertionError(f"child {self.proc.pid} exited:\n{self.errors()}")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def call(self, op: str, timeout: float = 20.0, **args: Any) -> dict[str, Any]:
        self.send(op, **args)
        return self.receive(timeout)

    def ok(self, op: str, timeout: float = 20.0, **args: Any) -> Any:
        answer = self.call(op, timeout, **args)
        assert answer["ok"], f"{op} {args}: {answer}\n{self.errors()}"
        return answer["result"]

    def stop(self) -> None:
        if self.proc.poll() is None:
            with _suppress():
                os.kill(self.proc.pid, signal.SIGCONT)
            with _suppress():
                self.send("close")
            try:
                self.proc.wait(10.0)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10.0)
        self.stderr.close()


class _suppress:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return exc[0] is not None and issubclass(exc[0], OSError)  # type: ignore[arg-type]

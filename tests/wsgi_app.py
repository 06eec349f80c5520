"""A tiny WSGI application for tests/test_gunicorn.py, served by a real gunicorn.

Like a Flask or Django app, it creates its Store at import time: with
``gunicorn --preload`` that is in the master, before it forks the workers,
which then use the Store they inherited. ``POST /count/<key>`` adds one to the
key's ``count`` in a ``store.session(key)`` block and answers the value it
produced; ``GET /ping`` answers without touching the store (readiness).

Configured by environment variables: ``SESSIONSTORE_TEST_DSN_RESOLVED``,
``WSGI_TEST_SCHEMA`` and ``WSGI_TEST_STORE``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from typing import Any

import sessionstore as ss

# Short leases so a test never waits out production defaults. lock_timeout (how
# long a request's load may wait for the key while another worker holds it) stays
# well below gunicorn's --timeout (30 s in the test): a sync worker busy in one
# request does not heartbeat the arbiter, which kills it past --timeout; a load
# that cannot get the key must fail the request first, not get the worker killed.
store = ss.Store(
    name=os.environ["WSGI_TEST_STORE"],
    template={"count": 0},
    dsn=os.environ["SESSIONSTORE_TEST_DSN_RESOLVED"],
    db_schema=os.environ["WSGI_TEST_SCHEMA"],
    lock_timeout=10.0,
    lock_duration=5.0,
    lock_refresh_interval=1.0,
    retry_timeout=5.0,
)

StartResponse = Callable[[str, list[tuple[str, str]]], Any]


def count(key: str) -> int:
    """Add one to ``key``'s count; the value this increment produced."""
    produced: list[int] = []

    def increment(data: Any) -> bool:
        data["count"] += 1
        produced.append(data["count"])
        return True

    with store.session(key) as s:
        assert s.update(increment) is True
    return produced[-1]


def application(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
    path: str = environ.get("PATH_INFO", "")
    payload: dict[str, object]
    if path == "/ping":
        status, payload = "200 OK", {"pid": os.getpid()}
    elif path.startswith("/count/") and environ.get("REQUEST_METHOD") == "POST":
        value = count(path.removeprefix("/count/"))
        status, payload = "200 OK", {"count": value, "pid": os.getpid(), "holder": store.holder}
    else:
        status, payload = "404 Not Found", {"error": path}
    body = json.dumps(payload).encode()
    start_response(
        status, [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
    )
    return [body]

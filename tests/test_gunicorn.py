"""A real gunicorn serving an app whose Store is created at import time (DESIGN §6).

tests/wsgi_app.py creates its Store when it is imported, as Flask and Django
apps do. With ``--preload`` gunicorn imports it in the master and forks the
workers, which use the Store they inherited: each must act as a fresh Store
with its own holder, connections and threads. Concurrent clients increment one
hot key (and a key of their own) through ``store.session(key)`` blocks on
every worker at once; no request may fail and no increment may be lost, and
on SIGTERM gunicorn must stop promptly, every worker closing its Store at exit
(no lease left behind).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import wait_until
from gunicorn_helpers import (
    TESTS,
    Response,
    Server,
    request,
    shutdown,
    stop_gracefully,
)
from gunicorn_helpers import start as start_gunicorn

import sessionstore as ss

CLIENTS = 8
HOT_PER_CLIENT = 25
OWN_PER_CLIENT = 5
HOT_KEY = "hot"


@pytest.fixture
def gunicorn(
    sessionstore_dsn: str, sessionstore_schema: str, store_name: str, tmp_path: Path
) -> Iterator[Callable[..., Server]]:
    """Start gunicorn serving tests/wsgi_app.py; stopped (and its log printed) at teardown."""
    servers: list[Server] = []

    def start(*options: str) -> Server:
        server = start_gunicorn(
            "wsgi_app:application",
            *options,
            env={
                "SESSIONSTORE_TEST_DSN_RESOLVED": sessionstore_dsn,
                "WSGI_TEST_SCHEMA": sessionstore_schema,
                "WSGI_TEST_STORE": store_name,
            },
            pythonpath=[TESTS],
            cwd=tmp_path,  # no gunicorn.conf.py is picked up from the working directory
        )
        servers.append(server)
        return server

    yield start
    for server in servers:
        shutdown(server)


@pytest.mark.parametrize(
    ("workers", "options"),
    [
        pytest.param(3, ["--preload"], id="sync-preload"),
        pytest.param(
            2, ["--preload", "--worker-class", "gthread", "--threads", "4"], id="gthread-preload"
        ),
    ],
)
def test_gunicorn_workers_share_a_hot_key_without_losing_an_increment(
    gunicorn: Callable[..., Server],
    make_store: Callable[..., ss.Store],
    sessionstore_dsn: str,
    sessionstore_schema: str,
    store_name: str,
    workers: int,
    options: list[str],
) -> None:
    server = gunicorn("--workers", str(workers), *options)
    wait_until(
        lambda: server.log().count("Booting worker with pid") >= workers,
        30.0,
        f"{workers} gunicorn workers to boot",
    )
    wait_until(lambda: request(server, "GET", "/ping").status == 200, 30.0, "GET /ping")

    # Every client does its hot-key requests with those on its own key spread among them.
    step = (HOT_PER_CLIENT + OWN_PER_CLIENT) // OWN_PER_CLIENT
    plans = [
        [f"own{index}" if n % step == step - 1 else HOT_KEY for n in range(step * OWN_PER_CLIENT)]
        for index in range(CLIENTS)
    ]
    assert all(plan.count(HOT_KEY) == HOT_PER_CLIENT for plan in plans)
    results: list[list[tuple[str, Response]]] = [[] for _ in range(CLIENTS)]
    start = threading.Barrier(CLIENTS)

    def client(index: int) -> None:
        start.wait(10.0)
        for key in plans[index]:
            results[index].append((key, request(server, "POST", f"/count/{key}")))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60.0)
    assert not any(t.is_alive() for t in threads), "clients still running after 60 s"
    elapsed = time.monotonic() - started

    answers = [(key, response) for done in results for key, response in done]
    assert len(answers) == CLIENTS * (HOT_PER_CLIENT + OWN_PER_CLIENT)
    failed = [(key, r.status, r.error) for key, r in answers if r.status != 200]
    assert not failed, f"{len(failed)} requests failed, e.g. {failed[:3]}"

    # No increment lost or repeated: the hot key's increments produced 1..N, once each.
    hot = [r.body for key, r in answers if key == HOT_KEY]
    assert sorted(b["count"] for b in hot) == list(range(1, CLIENTS * HOT_PER_CLIENT + 1))
    for index, done in enumerate(results):
        own = [r.body["count"] for key, r in done if key == f"own{index}"]
        assert own == list(range(1, OWN_PER_CLIENT + 1))
    # Several workers served the hot key, each with a holder of its own (not the master's).
    holders = {r.body["pid"]: r.body["holder"] for _, r in answers}
    assert len({b["pid"] for b in hot}) >= 2, f"one worker served everything in {elapsed:.1f}s"
    assert len(set(holders.values())) == len(holders), holders
    assert {r.body["holder"] for _, r in answers} == set(holders.values())

    mine = make_store(template={"count": 0})
    assert mine.peek(HOT_KEY) == {"count": CLIENTS * HOT_PER_CLIENT}
    for index in range(CLIENTS):
        assert mine.peek(f"own{index}") == {"count": OWN_PER_CLIENT}

    # SIGTERM: gunicorn stops promptly, its workers closing their Stores at exit.
    stop_gracefully(
        server,
        sessionstore_dsn,
        sessionstore_schema,
        store_name,
        bad=("Traceback", "[ERROR]", "[CRITICAL]", "WORKER TIMEOUT"),
    )

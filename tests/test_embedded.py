"""The embedded server: a user killed with SIGKILL cannot keep it running forever."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import wait_until

from sessionstore.embedded import EMBEDDED_DIR_ENV

# Its own embedded server: the same run on the Citus step would add nothing.
pytestmark = pytest.mark.plain_postgres

USER = """
import sys, time
from sessionstore.embedded import embedded_dsn
embedded_dsn()
print("up", flush=True)
if sys.argv[1] == "wait":
    time.sleep(600)
"""


def server_running(data_dir: Path) -> bool:
    pid_file = data_dir / "postmaster.pid"
    if not pid_file.exists():
        return False
    pid = int(pid_file.read_text().split()[0])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_killed_user_does_not_keep_the_server_running(tmp_path: Path) -> None:
    data_dir = tmp_path / "pg"
    env = {**os.environ, EMBEDDED_DIR_ENV: str(data_dir)}
    killed = subprocess.Popen(
        [sys.executable, "-c", USER, "wait"], env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert killed.stdout is not None and killed.stdout.readline().strip() == "up"
        assert server_running(data_dir)
    finally:
        killed.send_signal(signal.SIGKILL)
        killed.wait(30)
    # The next user reuses the server and, exiting last, stops it.
    result = subprocess.run(
        [sys.executable, "-c", USER, "exit"], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    wait_until(lambda: not server_running(data_dir), 30, "the embedded server to stop")

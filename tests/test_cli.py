"""The ``sessionstore`` command line, run as the installed console script on the test server.

Every verb runs in a subprocess, as an operator would run it; independent
runs start together (each is a Python start-up, about two seconds), so the
whole file takes seconds, not minutes. The in-process Stores are the
application around it: they hold keys, save versions, and find out that an
unlock fenced them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from conftest import Sql, wait_until

import sessionstore as ss
from sessionstore import cli, db


def _console_script() -> list[str]:
    """The installed ``sessionstore`` script of this interpreter (else ``-m sessionstore.cli``)."""
    beside = Path(sys.executable).with_name("sessionstore")
    if beside.is_file():
        return [str(beside)]
    found = shutil.which("sessionstore")
    return [found] if found else [sys.executable, "-m", "sessionstore.cli"]


SCRIPT = _console_script()


@dataclass
class Run:
    """One finished run: exit code, standard output and error."""

    args: Sequence[str]
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)

    def json_lines(self) -> list[Any]:
        return [json.loads(line) for line in self.out.splitlines() if line.strip()]

    def failed_cleanly(self, code: int) -> str:
        """Assert exit ``code`` with one ``sessionstore: error:`` line and no traceback; it."""
        assert self.code == code, self
        assert "Traceback" not in self.err, self
        lines = self.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("sessionstore: error: "), self
        return lines[0]


class Cli:
    """Runs the console script against the test server and schema."""

    def __init__(self, dsn: str, schema: str) -> None:
        self.target = ["--dsn", dsn, "--schema", schema]

    def start(self, *args: str, target: bool = True, **options: Any) -> subprocess.Popen[str]:
        added = self.target if target else []
        at = args.index("--") if "--" in args else len(args)  # after "--": arguments only
        argv = [*SCRIPT, *args[:at], *added, *args[at:]]
        return subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            **options,
        )

    def finish(self, proc: subprocess.Popen[str]) -> Run:
        out, err = proc.communicate(timeout=90)
        return Run(proc.args[len(SCRIPT) :], proc.returncode, out, err)  # type: ignore[index]

    def __call__(self, *args: str, target: bool = True, **options: Any) -> Run:
        return self.finish(self.start(*args, target=target, **options))

    def all(self, *runs: Sequence[str]) -> list[Run]:
        """Run each argv at the same time (each with the target options); their results."""
        procs = [self.start(*argv) for argv in runs]
        return [self.finish(proc) for proc in procs]


@pytest.fixture
def run(sessionstore_dsn: str, sessionstore_schema: str) -> Cli:
    return Cli(sessionstore_dsn, sessionstore_schema)


def _save(store: ss.Store, key: str, *values: int) -> None:
    """Save one version of ``key`` per value (``coins``), and unload it."""
    store.load(key)
    for value in values:
        store.update(key, lambda d, v=value: d.update(coins=v) or True)
        store.save(key)
    store.unload(key)


# -- the read-only verbs ----------------------------------------------------------------------


def test_keys_peek_versions_locks(
    run: Cli, make_store: Callable[..., ss.Store], store_name: str
) -> None:
    store = make_store()
    _save(store, "a:1", 1, 2)
    _save(store, "a:2", 5)
    _save(store, "b:1", 7)
    store.load("a:2")  # held, alive, while the CLI looks
    keys, prefixed, peek, old, versions, locks, one_lock, nothing = run.all(
        ["keys", store_name],
        ["keys", store_name, "--prefix", "a:", "--json"],
        ["peek", store_name, "a:1"],
        ["peek", store_name, "a:1", "--version", "1", "--json"],
        ["versions", store_name, "a:1", "--json"],
        ["locks", store_name],
        ["locks", store_name, "a:2", "--json"],
        ["locks", store_name, "b:1"],
    )
    assert keys.code == 0 and keys.out.splitlines() == ["a:1", "a:2", "b:1"], keys
    assert prefixed.json_lines() == [{"key": "a:1"}, {"key": "a:2"}]
    assert peek.code == 0 and json.loads(peek.out) == {"coins": 2, "inventory": []}, peek
    assert "version 2" in peek.err  # what was read, for the operator (stdout stays data)
    assert old.json()["version"] == 1 and old.json()["data"]["coins"] == 1
    assert [v["version"] for v in versions.json_lines()] == [2, 1]
    assert {"created_at", "size", "token", "migrations"} <= set(versions.json_lines()[0])

    header, row = locks.out.splitlines()
    assert header.split()[:4] == ["KEY", "HOLDER", "HOST", "PID"], locks
    assert row.split()[:2] == ["a:2", store.holder] and str(os.getpid()) in row.split()
    (lease,) = one_lock.json_lines()
    assert lease["holder"] == store.holder and lease["pid"] == os.getpid()
    assert lease["active"] and lease["liveness"] and lease["alive"]
    assert lease["last_save"] is not None and lease["expires_at"] > lease["acquired_at"]
    assert nothing.code == 0 and nothing.out == "" and "no leases" in nothing.err


# -- the 3 a.m. path: locks, unlock --reason, audit -------------------------------------------


def test_unlock_fences_a_live_holder_and_frees_the_key_at_once(
    run: Cli, make_store: Callable[..., ss.Store], store_name: str, sql: Sql
) -> None:
    lost: list[str] = []
    # No heartbeat before the holder's next save: that save finds out by the fence.
    holder = make_store(lock_duration=60.0, lock_refresh_interval=20.0, on_lock_lost=lost.append)
    holder.load("stuck")
    holder.update("stuck", lambda d: d.update(coins=3) or True)
    holder.save("stuck")
    before = sql.lease("stuck")

    unlocked = run("unlock", store_name, "stuck", "--reason", "INC-7: holder wedged", "--json")
    assert unlocked.code == 0, unlocked
    done = unlocked.json()
    assert done["old_holder"] == holder.holder and done["old_token"] == before.token
    assert done["new_token"] > before.token and done["was_alive"] and done["was_active"]

    # A new process loads the key at once: no lock_timeout wait, no handoff asked for.
    other = make_store(lock_timeout=10.0)
    started = time.monotonic()
    other.load("stuck")
    assert time.monotonic() - started < 2.0
    assert other.get("stuck")["coins"] == 3  # the holder's last save is kept
    assert sql.lease("stuck").token > done["new_token"]

    # The old holder is fenced: its next save writes nothing and says so.
    holder.update("stuck", lambda d: d.update(coins=99) or True)
    with pytest.raises(ss.LockLostError):
        holder.save("stuck")
    wait_until(lambda: lost == ["stuck"], 5.0, "on_lock_lost for the stolen key")
    other.unload("stuck")
    assert other.peek("stuck")["coins"] == 3

    audit, human, again = run.all(
        ["audit", store_name, "stuck", "--json"],
        ["audit", store_name],
        ["unlock", store_name, "free", "--reason", "nothing to do"],
    )
    (row,) = audit.json_lines()
    assert row["reason"] == "INC-7: holder wedged" and row["action"] == "unlock"
    assert row["old_holder"] == holder.holder and row["new_token"] == done["new_token"]
    assert "@" in row["actor"] and row["id"] == done["audit_id"]
    assert "INC-7: holder wedged" in human.out and human.out.startswith("ID")
    assert "is not locked" in again.failed_cleanly(1)


# -- the verbs that take the lease, and send ----------------------------------------------------


def test_restore_send_erase(
    run: Cli, make_store: Callable[..., ss.Store], store_name: str, sql: Sql
) -> None:
    store = make_store()
    _save(store, "k", 1, 2)
    _save(store, "gone", 4)
    refusing = make_store(on_handoff_request=lambda key: False)
    _save(refusing, "held", 8)
    refusing.load("held")

    restored, refused, missing, sent, negative = run.all(
        ["restore", store_name, "k", "1", "--json"],
        ["restore", store_name, "held", "1", "--lock-timeout", "0.5"],
        ["restore", store_name, "k", "9"],
        ["send", store_name, "m", '{"gift": "sword"}', "--json"],
        ["send", store_name, "m", "--", "-5"],
    )
    assert restored.code == 0 and restored.json() == {
        "store": store_name,
        "key": "k",
        "restored": 1,
        "version": 3,
    }, restored
    assert "is held" in refused.failed_cleanly(1)
    assert "has no version 9" in missing.failed_cleanly(1)
    assert sent.code == 0 and isinstance(sent.json()["message_id"], int), sent
    assert negative.code == 0 and "sent message" in negative.out, negative
    bodies = [row.body for row in sql.rows("SELECT body FROM {s}.messages WHERE store = :store")]
    assert sorted(bodies, key=json.dumps) == [-5, {"gift": "sword"}]  # sent at the same time

    erased, peek = run.all(["erase", store_name, "gone", "--json"], ["peek", store_name, "k"])
    assert erased.code == 0 and erased.json()["erased"], erased
    assert json.loads(peek.out)["coins"] == 1 and "version 3" in peek.err
    assert store.peek("gone") is None and store.list_versions("k")[0].version == 3


# -- usage errors (2) and failures (1): one line, no traceback, no password --------------------


def test_bad_usage_exits_2_and_failures_exit_1(
    run: Cli, sessionstore_dsn: str, sessionstore_schema: str, store_name: str
) -> None:
    url = sa.make_url(db.resolve_url(sessionstore_dsn))
    secret = "s3cret-pw"
    wrong_db = url.set(database="no_such_db", password=secret).render_as_string(hide_password=False)
    mysql = f"mysql://u:{secret}@db.example/app"
    target = run.target
    usage = [
        run.start("frobnicate", target=False),
        run.start("unlock", store_name, "k"),  # --reason is required
        run.start("unlock", store_name, "k", "--reason", " "),
        run.start("peek", "not a name!", "k"),
        run.start("peek", store_name, "k", "--version", "zero"),
        run.start("restore", store_name, "k", "x"),
        run.start("restore", store_name, "k", "0"),
        run.start("send", store_name, "k", "{not json"),
        run.start("keys", store_name, "--dsn", mysql, "--schema", "sessionstore", target=False),
        run.start("keys", store_name, "--dsn", target[1], "--schema", "pg_catalog", target=False),
        run.start("migrate", "--app", "no_such_module:store", target=False),
    ]
    failures = [
        run.start("peek", store_name, "never-saved"),
        # Not retried: a server that answers "no such database" (a store's calls are retried).
        run.start("db", "current", "--dsn", wrong_db, target=False),
    ]
    fine = run.start("db", "current")
    for proc in usage:
        result = run.finish(proc)
        result.failed_cleanly(2)
        assert secret not in result.err
    failed = [run.finish(proc) for proc in failures]
    for result in failed:
        assert secret not in result.failed_cleanly(1)
    assert "has no saved data" in failed[0].err
    assert "no_such_db" in failed[1].err
    current = run.finish(fine)
    assert current.code == 0, current
    assert f"schema {sessionstore_schema}: at revision {db.head_revision()}" in current.out


def test_a_schema_without_the_audit_table_says_to_upgrade(
    run: Cli, sessionstore_dsn: str, store_name: str
) -> None:
    result = run(
        "audit", store_name, "--dsn", sessionstore_dsn, "--schema", "no_such_schema", target=False
    )
    assert "sessionstore db upgrade" in result.failed_cleanly(1)


# -- many keys: export, import, migrate ----------------------------------------------------------

APP = """
import os
import sessionstore as ss


def make():
    return ss.Store(
        os.environ["CLI_TEST_STORE"],
        template={"coins": 0},
        migrations=[ss.add_fields("gems", {"gems": 0})],
        dsn=os.environ["SESSIONSTORE_TEST_DSN_RESOLVED"],
        db_schema=os.environ["CLI_TEST_SCHEMA"],
    )
"""


def test_export_import_migrate(
    run: Cli,
    make_store: Callable[..., ss.Store],
    store_name: str,
    sessionstore_schema: str,
    tmp_path: Path,
) -> None:
    source = make_store()
    for n in range(3):
        _save(source, f"p{n}", n + 1)
    dump = tmp_path / "dump.jsonl"
    to_file, to_stdout = run.all(
        ["export", store_name, "-o", str(dump), "--json"], ["export", store_name]
    )
    assert to_file.code == 0 and to_file.json()["exported"] == 3, to_file
    lines = [json.loads(line) for line in dump.read_text().splitlines()]
    assert [line["key"] for line in lines] == ["p0", "p1", "p2"]
    assert lines[2] == {
        "key": "p2",
        "version": 1,
        "migrations": [],
        "data": {"coins": 3, "inventory": []},
    }
    assert [json.loads(line) for line in to_stdout.out.splitlines()] == lines
    assert "exported 3 keys" in to_stdout.err  # the summary stays off the data

    target = f"{store_name}-copy"
    imported = run("import", target, str(dump), "--json")
    assert imported.code == 0 and imported.json()["imported"] == 3, imported
    again = run("import", target, str(dump))
    assert again.code == 0 and "skipped 3" in again.out, again

    (tmp_path / "cli_app.py").write_text(textwrap.dedent(APP))
    env = {**os.environ, "CLI_TEST_STORE": target, "CLI_TEST_SCHEMA": sessionstore_schema}
    migrated = run(
        "migrate", "--app", "cli_app:make", "--json", target=False, cwd=tmp_path, env=env
    )
    assert migrated.code == 0, migrated
    assert migrated.json() == {"updated": 3, "unchanged": 0, "held": [], "failed": {}}
    peek = run("peek", target, "p2", "--json")
    assert peek.json()["data"] == {"coins": 3, "inventory": [], "gems": 0} and peek.json()[
        "migrations"
    ] == ["gems"]


# -- the command tree, for the integrations -------------------------------------------------------


def test_argv_for_renders_parsed_values_back() -> None:
    """What ``flask sessionstore`` runs: options first, then ``--`` and the arguments."""
    argv = cli.argv_for(
        ("send",), {"store": "s", "key": "-k", "message": "-5", "dsn": None, "as_json": True}
    )
    assert argv == ["send", "--json", "--", "s", "-k", "-5"]
    argv = cli.argv_for(("db", "current"), {"dsn": "x", "schema": "y"})
    assert argv == ["db", "current", "--dsn", "x", "--schema", "y"]
    # The argparse rendering the Django command reads the options of a command from.
    assert cli._parser().parse_args(["unlock", "s", "k", "--reason", "r"]).reason == "r"

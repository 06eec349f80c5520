"""Least privilege: a Store on a role with DML rights only (docs/scaling.md).

A private server (tests/pg_server.py) logs every DDL statement and every
error with the role that sent it (``log_statement = 'ddl'``,
``log_line_prefix = '%u '``), so "never attempts DDL" is read off the
server's own log. The schema is upgraded by its owner with the real
``sessionstore db upgrade``; the application role gets exactly the GRANTs
the docs show (:func:`sessionstore._storage.privileges.grant_sql`, which
the first test compares with docs/scaling.md).
"""

from __future__ import annotations

import logging
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from conftest import FAST
from pg_server import PgServer, find_binaries

import sessionstore as ss
from sessionstore import db
from sessionstore._storage.privileges import grant_sql

# Its own PostgreSQL server: the same run on the Citus step would add nothing.
pytestmark = pytest.mark.plain_postgres

DOCS = Path(__file__).resolve().parent.parent / "docs" / "scaling.md"
OWNER_PASSWORD = "owner-pw-Zq81"
APP_PASSWORD = "app-pw-Xk27"


@dataclass
class Cluster:
    server: PgServer

    def dsn(self, role: str, password: str) -> str:
        return f"postgresql://{role}:{password}@127.0.0.1:{self.server.port}/app"

    @property
    def owner_dsn(self) -> str:
        return self.dsn("owner", OWNER_PASSWORD)

    @property
    def app_dsn(self) -> str:
        return self.dsn("app", APP_PASSWORD)

    def run(self, sql: str, role: str = "owner", password: str = OWNER_PASSWORD) -> None:
        with psycopg.connect(self.dsn(role, password), autocommit=True) as conn:
            conn.execute(sql)  # type: ignore[arg-type]

    def admin(self, sql: str) -> list[Any]:
        """``sql`` as the superuser in database ``app`` (committed); the rows, if any."""
        with psycopg.connect(self.server.admin_dsn.replace("/postgres?", "/app?")) as conn:
            cursor = conn.execute(sql)  # type: ignore[arg-type]
            return cursor.fetchall() if cursor.description else []


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    """``owner`` may create schemas in database ``app``; ``app`` may create nothing anywhere."""
    server = PgServer(find_binaries(ssl=False))
    try:
        server.start(
            {
                "log_statement": "'ddl'",
                "log_line_prefix": "'%u '",
                "password_encryption": "'scram-sha-256'",
            },
            ["host all all 127.0.0.1/32 scram-sha-256"],
        )
        with psycopg.connect(server.admin_dsn, autocommit=True) as conn:
            conn.execute(f"CREATE ROLE owner LOGIN PASSWORD '{OWNER_PASSWORD}'")  # type: ignore[arg-type]
            conn.execute(f"CREATE ROLE app LOGIN PASSWORD '{APP_PASSWORD}'")  # type: ignore[arg-type]
            conn.execute("CREATE DATABASE app")
            conn.execute("GRANT CREATE ON DATABASE app TO owner")
            # PUBLIC may create temporary tables by default: that is DDL too.
            conn.execute("REVOKE TEMPORARY ON DATABASE app FROM PUBLIC")
        yield Cluster(server)
    finally:
        server.stop()


@pytest.fixture
def schema() -> str:
    return f"p_{uuid.uuid4().hex[:8]}"


def upgrade_as_owner(cluster: Cluster, schema: str) -> None:
    """The deploy step, as the docs give it: the owner runs ``sessionstore db upgrade``."""
    command = ["db", "upgrade", "--dsn", cluster.owner_dsn, "--schema", schema]
    done = subprocess.run(
        [sys.executable, "-m", "sessionstore.cli", *command],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert f"at revision {db.head_revision()}" in done.stdout


def app_store(cluster: Cluster, schema: str, **options: Any) -> ss.Store:
    settings = {**FAST, "name": f"s{uuid.uuid4().hex[:8]}", **options}
    return ss.Store(template={"coins": 0}, dsn=cluster.app_dsn, db_schema=schema, **settings)


def app_log(cluster: Cluster, since: int) -> list[str]:
    """The server's log lines sent by role ``app`` from byte ``since`` until now.

    "Now" is a DDL statement of the owner's, logged after everything sent
    before it: once the log shows it, nothing earlier is still unwritten.
    """
    marker = f"m_{uuid.uuid4().hex[:10]}"
    cluster.run(f"CREATE SCHEMA {marker}")
    text = cluster.server.wait_for_log(marker, since)
    assert marker in text, f"the server never logged {marker!r}"
    return [line for line in text.splitlines() if line.startswith("app ")]


def attempts(lines: list[str]) -> list[str]:
    """The statements logged (DDL, with log_statement = 'ddl') and the errors."""
    return [line for line in lines if "statement:" in line or "ERROR" in line]


def docs_grants() -> str:
    section = DOCS.read_text().split("## Least privilege and TLS", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```sql\n(.*?)```", section, re.S)
    grants = [b.strip() for b in blocks if b.lstrip().startswith("GRANT USAGE ON SCHEMA")]
    assert len(grants) == 1, f"expected one block of GRANTs in docs/scaling.md, got {grants}"
    return grants[0]


def test_docs_show_the_grants_the_tests_run() -> None:
    assert docs_grants() == grant_sql("sessionstore", "app")


def test_app_role_has_no_create_anywhere(cluster: Cluster) -> None:
    found = cluster.admin(
        "SELECT has_database_privilege('app', 'app', 'CREATE'), "
        "has_database_privilege('app', 'app', 'TEMPORARY'), "
        "(SELECT array_agg(nspname) FROM pg_namespace "
        " WHERE has_schema_privilege('app', oid, 'CREATE'))"
    )
    assert found == [(False, False, None)]


def test_dml_only_role_runs_a_store_and_never_attempts_ddl(cluster: Cluster, schema: str) -> None:
    upgrade_as_owner(cluster, schema)
    cluster.run(grant_sql(schema, "app"))
    db.clear_schema_cache()
    since = cluster.server.log_size()
    with app_store(cluster, schema, message_handler=lambda key, data, msg: True) as store:
        store.load("k1")
        store.update("k1", lambda d: d.update(coins=5) or True, durable=True)
        store.send_message("k2", {"gift": 1})
        store.load("k2")
        store.tx(["k1", "k2"], lambda docs: docs["k2"].update(coins=1) or True)
        assert [v.version for v in store.list_versions("k1")] == [1]
        store.unload("k2")
        assert store.peek("k2") == {"coins": 1}
        assert sorted(store.keys()) == ["k1", "k2"]
        store.erase("k2")
        store.prune()
    assert attempts(app_log(cluster, since)) == []
    # The log would show one: the same role's DDL attempt is there.
    since = cluster.server.log_size()
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        cluster.run(f"CREATE TABLE {schema}.probe ()", "app", APP_PASSWORD)
    assert f"app LOG:  statement: CREATE TABLE {schema}.probe ()" in attempts(
        app_log(cluster, since)
    )


def upgrade_to(cluster: Cluster, schema: str, revision: str) -> None:
    """As the owner, the schema at ``revision`` (a deploy of an older sessionstore)."""
    from sqlalchemy import create_engine

    from alembic import command

    engine = create_engine(db.resolve_url(cluster.owner_dsn))
    try:
        with engine.connect() as conn:
            command.upgrade(db.alembic_config(schema, conn), revision)
            conn.commit()
    finally:
        engine.dispose()


def previous_revision() -> str:
    from alembic.script import ScriptDirectory

    scripts = ScriptDirectory.from_config(db.alembic_config())
    down = scripts.get_revision(db.head_revision()).down_revision  # type: ignore[union-attr]
    assert isinstance(down, str)
    return down


def test_schema_behind_head_says_run_db_upgrade_as_the_owner(cluster: Cluster, schema: str) -> None:
    old, head = previous_revision(), db.head_revision()
    upgrade_to(cluster, schema, old)
    cluster.run(grant_sql(schema, "app"))
    db.clear_schema_cache()
    since = cluster.server.log_size()
    with pytest.raises(ss.InsufficientPrivilegeError) as caught:
        app_store(cluster, schema)
    message = str(caught.value)
    assert (
        f"schema {schema!r} is at revision {old}, this sessionstore needs revision {head}"
        in message
    )
    assert f"run `sessionstore db upgrade --schema {schema}` as the schema's owner" in message
    assert "role 'app'" in message and "does not own the schema" in message
    assert caught.value.__cause__ is None  # refused before any DDL: not an error mid-migration
    assert APP_PASSWORD not in message
    assert attempts(app_log(cluster, since)) == []
    assert cluster.admin(f"SELECT version_num FROM {schema}.alembic_version") == [(old,)]


def test_schema_not_created_says_so(cluster: Cluster, schema: str) -> None:
    db.clear_schema_cache()
    with pytest.raises(ss.InsufficientPrivilegeError, match="is not created") as caught:
        app_store(cluster, schema)
    assert "may not create schemas in this database" in str(caught.value)


def test_owner_that_may_not_create_gets_the_same_clear_error(cluster: Cluster, schema: str) -> None:
    """An owner lacking a right the upgrade needs: the denial mid-upgrade is said plainly.

    It owns the schema and its tables but may create neither in the database
    nor in the schema (an owner can revoke its own rights): whichever DDL
    statement comes first is denied.
    """
    upgrade_to(cluster, schema, previous_revision())
    role = f"o_{uuid.uuid4().hex[:8]}"
    cluster.admin(f"CREATE ROLE {role} LOGIN PASSWORD 'pw-{role}'")
    relations = cluster.admin(
        f"SELECT relname FROM pg_class WHERE relnamespace = '{schema}'::regnamespace "
        "AND relkind = 'r'"
    )
    cluster.admin(
        f"ALTER SCHEMA {schema} OWNER TO {role}; "
        + "".join(f"ALTER TABLE {schema}.{name} OWNER TO {role}; " for (name,) in relations)
    )
    cluster.admin(f"SET ROLE {role}; REVOKE CREATE ON SCHEMA {schema} FROM {role}")
    db.clear_schema_cache()
    with pytest.raises(ss.InsufficientPrivilegeError) as caught:
        ss.Store("x", {}, dsn=cluster.dsn(role, f"pw-{role}"), db_schema=schema, **FAST)
    message = str(caught.value)
    assert f"run `sessionstore db upgrade --schema {schema}` as the schema's owner" in message
    assert "permission denied for" in message  # the database's or the schema's CREATE
    assert f"pw-{role}" not in message
    assert caught.value.__cause__ is not None  # the denied statement, chained


def test_every_missing_privilege_is_listed_at_start(
    cluster: Cluster, schema: str, caplog: pytest.LogCaptureFixture
) -> None:
    upgrade_as_owner(cluster, schema)
    cluster.run(grant_sql(schema, "app"))
    cluster.run(
        f"REVOKE DELETE ON {schema}.versions FROM app; "
        f"REVOKE USAGE ON SEQUENCE {schema}.lease_tokens FROM app"
    )
    db.clear_schema_cache()
    started = time.monotonic()
    with (
        caplog.at_level(logging.WARNING, "sessionstore"),
        pytest.raises(ss.InsufficientPrivilegeError) as caught,
    ):
        app_store(cluster, schema, retry_timeout=5.0)
    assert time.monotonic() - started < 3.0  # not retried as transient
    assert not [r for r in caplog.records if "retrying" in r.getMessage()]
    error = caught.value
    assert isinstance(error, PermissionError) and isinstance(error, ss.StorageUnavailableError)
    assert error.missing == (
        f"DELETE on table {schema}.versions",
        f"USAGE on sequence {schema}.lease_tokens",
    )
    assert (
        f"the database role 'app' lacks privileges sessionstore needs in schema {schema!r}"
        in str(error)
    )
    assert APP_PASSWORD not in str(error)


def test_a_privilege_revoked_later_fails_the_call_that_needs_it(
    cluster: Cluster, schema: str
) -> None:
    upgrade_as_owner(cluster, schema)
    cluster.run(grant_sql(schema, "app"))
    db.clear_schema_cache()
    with app_store(cluster, schema, retry_timeout=5.0) as store:
        store.load("k")
        store.save("k")
        store.unload("k")
        cluster.run(f"REVOKE DELETE ON {schema}.versions FROM app")
        started = time.monotonic()
        with pytest.raises(ss.InsufficientPrivilegeError) as caught:
            store.erase("k")
        assert time.monotonic() - started < 3.0  # not retried
        message = str(caught.value)
        assert "permission denied for table versions" in message
        assert f"the database role 'app' lacks: DELETE on table {schema}.versions" in message
        assert caught.value.missing == (f"DELETE on table {schema}.versions",)
        assert isinstance(caught.value.__cause__, Exception)
        assert APP_PASSWORD not in message
        cluster.run(f"REVOKE USAGE ON SEQUENCE {schema}.lease_tokens FROM app")
        with pytest.raises(
            ss.InsufficientPrivilegeError, match=f"USAGE on sequence {schema}.lease_tokens"
        ):
            store.load("new-key")

"""Engines, DSNs and the alembic schema (sessionstore.db)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator

import psycopg.conninfo
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url

import sessionstore as ss
from sessionstore import db
from sessionstore._storage.codec import FileSettings, encode_file

TABLES = {
    "locks",
    "records",
    "versions",
    "shards",
    "applied_requests",
    "messages",
    "audit",
    "alembic_version",
}


@pytest.fixture
def engine(sessionstore_dsn: str) -> Iterator[sa.Engine]:
    eng = db.create_engine(sessionstore_dsn, pool_size=2)
    yield eng
    eng.dispose()


@pytest.fixture
def fresh_schema(engine: sa.Engine) -> Iterator[str]:
    schema = f"t_{uuid.uuid4().hex[:8]}"
    yield schema
    with engine.begin() as conn:
        conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
    db.clear_schema_cache()


# ------------------------------------------------------------------ identifiers


@pytest.mark.parametrize("name", ["sessionstore", "_x", "t_0123abcd", "a" * 63])
def test_validate_identifier_accepts(name: str) -> None:
    assert db.validate_identifier(name) == name


@pytest.mark.parametrize("name", ["", "1abc", "Abc", "a-b", 'a"b', "a b", "a" * 64, "é"])
def test_validate_identifier_rejects(name: str) -> None:
    with pytest.raises(ValueError, match="identifier"):
        db.validate_identifier(name)


# ------------------------------------------------------------------ URLs


@pytest.mark.parametrize(
    ("dsn", "expected"),
    [
        ("postgresql://u:pw@db.example:5432/app", "postgresql+psycopg://u:pw@db.example:5432/app"),
        ("postgres://u:pw@h/app", "postgresql+psycopg://u:pw@h/app"),
        ("postgresql+psycopg2://u@h:6543/app", "postgresql+psycopg://u@h:6543/app"),
        ("postgresql+psycopg://u@h/app", "postgresql+psycopg://u@h/app"),
        ("postgresql://u:p%40ss@h/app", "postgresql+psycopg://u:p%40ss@h/app"),
        (
            "postgresql://u@h/app?sslmode=require&application_name=x",
            "postgresql+psycopg://u@h/app?application_name=x&sslmode=require",
        ),
    ],
)
def test_resolve_url(dsn: str, expected: str) -> None:
    assert make_url(db.resolve_url(dsn)) == make_url(expected)


def test_resolve_url_unix_socket() -> None:
    url = make_url(db.resolve_url("postgresql://postgres:@/postgres?host=/tmp/sock dir"))
    assert url.drivername == "postgresql+psycopg"
    assert url.database == "postgres"
    assert url.username == "postgres"
    assert url.query["host"] == "/tmp/sock dir"


def test_resolve_url_keyvalue() -> None:
    url = make_url(db.resolve_url("host=/run/pg dbname=app user=me sslmode=disable"))
    assert url.drivername == "postgresql+psycopg"
    assert (url.database, url.username, url.host) == ("app", "me", None)
    assert dict(url.query) == {"host": "/run/pg", "sslmode": "disable"}
    url = make_url(db.resolve_url("host=db port=6000 dbname=app user=u password=s3cret"))
    assert (url.host, url.port, url.username, url.password) == ("db", 6000, "u", "s3cret")
    url = make_url(db.resolve_url("host=db dbname=app password=s3cret"))
    assert url.query["password"] == "s3cret"


@pytest.mark.parametrize(
    "dsn",
    [
        "host=db1,db2 port=5432,5433 dbname=app user=u password=s3cret "
        "target_session_attrs=read-write",
        "postgresql://u:s3cret@db1:5432,db2:5433/app?target_session_attrs=read-write",
    ],
)
def test_a_multi_host_dsn_reaches_engine_and_control_connection_whole(dsn: str) -> None:
    """The failover shape (docs/scaling.md): both hosts, in order, and the session attrs."""
    url = db.resolve_url(dsn)
    engine = db.create_engine(url)
    try:
        _, params = engine.dialect.create_connect_args(engine.url)
    finally:
        engine.dispose()
    control = psycopg.conninfo.conninfo_to_dict(db.libpq_conninfo(url))  # the control connection
    for given in (params, control):
        assert (given["host"], given["port"]) == ("db1,db2", "5432,5433"), given
        assert (given["dbname"], given["user"], given["password"]) == ("app", "u", "s3cret")
        assert given["target_session_attrs"] == "read-write"


def test_resolve_url_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SESSIONSTORE_DSN", "postgres://a@b/c")
    assert make_url(db.resolve_url(None)) == make_url("postgresql+psycopg://a@b/c")


@pytest.mark.parametrize("dsn", ["mysql://u@h/db", "sqlite:///x.db", "", "nonsense"])
def test_resolve_url_rejects(dsn: str) -> None:
    with pytest.raises(ValueError):
        db.resolve_url(dsn)


def test_resolve_url_error_hides_password() -> None:
    with pytest.raises(ValueError) as info:
        db.resolve_url("mysql://u:topsecret@h/db")
    assert "topsecret" not in str(info.value)


def test_create_engine_rejects_other_driver() -> None:
    other = sa.create_engine("sqlite://")
    with pytest.raises(ValueError, match="pysqlite"):
        db.create_engine(other)


def test_create_engine_settings() -> None:
    eng = db.create_engine("postgresql://u:pw@localhost/app", pool_size=3)
    try:
        assert eng.dialect.driver == "psycopg"
        assert eng.pool.size() == 3  # type: ignore[attr-defined]
        assert db.create_engine(eng) is eng
    finally:
        eng.dispose()


def test_migrate_lock_key_is_stable() -> None:
    key = db.migrate_lock_key("sessionstore")
    assert key == db.migrate_lock_key("sessionstore")
    assert key != db.migrate_lock_key("other")
    assert -(2**63) <= key < 2**63


def test_scripts_are_shipped() -> None:
    location = db.script_location()
    assert (location / "env.py").is_file()
    assert (location / "script.py.mako").is_file()
    assert (location / "versions" / "0001_initial.py").is_file()
    assert (location / "versions" / "0002_requests_messages.py").is_file()
    assert (location / "versions" / "0004_server_functions.py").is_file()
    assert (location / "versions" / "0005_load_in_one_call.py").is_file()
    assert (location / "versions" / "0006_releases_without_flush.py").is_file()
    assert db.head_revision() == "0006"


def test_alembic_folder_does_not_shadow_the_library() -> None:
    """The repo's alembic/ has no __init__.py: from the repo root the library still wins."""
    root = db.script_location().parent
    out = subprocess.run(
        [sys.executable, "-c", "import alembic.command, alembic; print(alembic.__file__)"],
        cwd=root,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.strip().endswith(os.path.join("alembic", "__init__.py"))
    assert not out.strip().startswith(str(root / "alembic"))


# ------------------------------------------------------------------ schema


def _objects(engine: sa.Engine, schema: str) -> tuple[set[str], set[str]]:
    with engine.connect() as conn:
        tables = set(
            conn.execute(
                sa.text("SELECT tablename FROM pg_tables WHERE schemaname = :s"), {"s": schema}
            ).scalars()
        )
        sequences = set(
            conn.execute(
                sa.text("SELECT sequencename FROM pg_sequences WHERE schemaname = :s"),
                {"s": schema},
            ).scalars()
        )
    return tables, sequences


def test_ensure_schema_creates_everything(engine: sa.Engine, fresh_schema: str) -> None:
    assert db.current_revision(engine, fresh_schema) is None
    db.ensure_schema(engine, fresh_schema)
    tables, sequences = _objects(engine, fresh_schema)
    assert tables == TABLES
    assert sequences == {"lease_tokens", "messages_id_seq", "audit_id_seq"}
    assert db.current_revision(engine, fresh_schema) == db.head_revision()

    s = fresh_schema
    with engine.connect() as conn:
        storage: dict[str, str] = dict(
            conn.execute(
                sa.text(
                    "SELECT a.attrelid::regclass::text || '.' || a.attname, a.attstorage "
                    "FROM pg_attribute a WHERE a.attrelid IN (CAST(:v AS regclass), "
                    "CAST(:sh AS regclass)) AND a.attname IN ('inline', 'data')"
                ),
                {"v": f"{s}.versions", "sh": f"{s}.shards"},
            ).all()
        )
        assert set(storage.values()) == {"e"}, storage
        token = conn.execute(sa.text(f"SELECT nextval('{s}.lease_tokens')")).scalar_one()
        assert token >= 1
        holder = uuid.uuid4()
        conn.execute(
            sa.text(
                f"INSERT INTO {s}.versions (store, key, version, holder, token, codec, raw_size, "
                "stored_size, checksum, shard_count) VALUES ('st', 'k', 1, :h, 1, 1, 10, 5, 0, 1)"
            ),
            {"h": holder},
        )
        conn.execute(sa.text(f"INSERT INTO {s}.shards VALUES ('st', 'k', 1, 0, '\\x00'::bytea)"))
        row = conn.execute(
            sa.text(f"SELECT migrations, inline, created_at FROM {s}.versions")
        ).one()
        assert row.migrations == [] and row.inline is None and row.created_at is not None
        conn.execute(sa.text(f"DELETE FROM {s}.versions"))
        shards = conn.execute(sa.text(f"SELECT count(*) FROM {s}.shards")).scalar_one()
        assert shards == 0  # ON DELETE CASCADE
        conn.execute(
            sa.text(
                f"INSERT INTO {s}.locks (store, key, holder, token, expires_at) "
                "VALUES ('st', 'k', :h, 1, clock_timestamp())"
            ),
            {"h": holder},
        )
        lock = conn.execute(sa.text(f"SELECT host, pid FROM {s}.locks")).one()
        assert tuple(lock) == ("", 0)
        conn.rollback()


def test_ensure_schema_is_idempotent(engine: sa.Engine, fresh_schema: str) -> None:
    db.ensure_schema(engine, fresh_schema)
    db.ensure_schema(engine, fresh_schema)  # cached
    db.clear_schema_cache()
    db.ensure_schema(engine, fresh_schema)  # one query
    with engine.connect() as conn:
        rows = conn.execute(sa.text(f"SELECT version_num FROM {fresh_schema}.alembic_version"))
        assert rows.scalars().all() == [db.head_revision()]


def test_downgrade_and_upgrade_again(engine: sa.Engine, fresh_schema: str) -> None:
    from alembic import command

    db.ensure_schema(engine, fresh_schema)
    with engine.connect() as conn:
        command.downgrade(db.alembic_config(fresh_schema, conn), "base")
        conn.commit()
    tables, sequences = _objects(engine, fresh_schema)
    assert tables == {"alembic_version"} and not sequences
    db.clear_schema_cache()
    db.ensure_schema(engine, fresh_schema)
    assert _objects(engine, fresh_schema)[0] == TABLES


def test_a_store_upgrades_a_schema_at_0001_and_keeps_its_data(
    engine: sa.Engine, fresh_schema: str, sessionstore_dsn: str
) -> None:
    """A deployment made by the previous release: saved keys load, the new features work."""
    from alembic import command

    with engine.connect() as conn:
        command.upgrade(db.alembic_config(fresh_schema, conn), "0001")
        conn.commit()
    assert db.current_revision(engine, fresh_schema) == "0001"
    assert _objects(engine, fresh_schema)[0] == TABLES - {"applied_requests", "messages", "audit"}
    # Saved by that release: the file format is unchanged, only the tables are new.
    file = encode_file(b'{"coins":7}', FileSettings())
    with engine.begin() as conn:
        conn.execute(
            sa.text(f"INSERT INTO {fresh_schema}.records (store, key) VALUES ('old', 'k')")
        )
        conn.execute(
            sa.text(
                f"INSERT INTO {fresh_schema}.versions (store, key, version, holder, token, "
                "codec, raw_size, stored_size, checksum, shard_count, inline) VALUES "
                "('old', 'k', 1, gen_random_uuid(), 1, :codec, :raw, :stored, :crc, 0, :inline)"
            ),
            {
                "codec": file.codec,
                "raw": file.raw_size,
                "stored": file.stored_size,
                "crc": file.checksum,
                "inline": file.inline,
            },
        )
    db.clear_schema_cache()
    store = ss.Store("old", {"coins": 0}, dsn=sessionstore_dsn, db_schema=fresh_schema)
    try:
        assert db.current_revision(engine, fresh_schema) == db.head_revision()
        assert store.peek("k") == {"coins": 7}
        store.load("k")
        assert store.update("k", lambda d: d.update(coins=8) or True, idempotency_key="r1")
        store.send_message("k", {"gift": 1})
        store.save("k")
        assert store.applied("k", "r1")
    finally:
        store.close()


_RACER = textwrap.dedent(
    """
    import sys, time
    from sessionstore import db
    dsn, schema, start = sys.argv[1], sys.argv[2], float(sys.argv[3])
    engine = db.create_engine(dsn, pool_size=1)
    time.sleep(max(0.0, start - time.time()))
    db.ensure_schema(engine, schema)
    print(db.current_revision(engine, schema))
    """
)


@pytest.mark.slow
def test_ensure_schema_races_across_processes(
    engine: sa.Engine, fresh_schema: str, sessionstore_dsn: str
) -> None:
    assert os.environ["SESSIONSTORE_TEST_DSN_RESOLVED"] == sessionstore_dsn
    start = time.time() + 3.0  # every racer has imported everything by then
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _RACER, sessionstore_dsn, fresh_schema, str(start)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    results = [p.communicate(timeout=90) for p in procs]
    for proc, (out, err) in zip(procs, results, strict=True):
        assert proc.returncode == 0, err
        assert out.strip() == db.head_revision()
    with engine.connect() as conn:
        rows = conn.execute(sa.text(f"SELECT version_num FROM {fresh_schema}.alembic_version"))
        assert rows.scalars().all() == [db.head_revision()]
    assert _objects(engine, fresh_schema)[0] == TABLES

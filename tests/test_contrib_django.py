"""The Django integration, sessionstore.contrib.django, with a real Django, PostgreSQL and gunicorn.

* The DSN built from ``DATABASES`` (socket directory or hostname, special
  characters, ``OPTIONS``): parsed back as libpq and as sessionstore read it,
  and connected with to the test server (engine, control connection, Store).
* The system checks, in this process (``check_settings`` needs no Django
  settings) and through ``manage.py check`` of examples/django_app.
* ``manage.py sessionstore db upgrade|current`` (the CLI, configured by settings).
* ``get_store``: nothing made at setup, import of the WSGI app or check time;
  one Store per process however many threads ask first; a forked child's is
  its own (in a subprocess: Django settings are process-global).
* The example app under gunicorn in three modes, hammered by 8 client threads.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from conftest import wait_until
from django.core.exceptions import ImproperlyConfigured
from gunicorn_helpers import (
    EXAMPLE_MODES,
    ROOT,
    Response,
    Server,
    booted_workers,
    shutdown,
    start,
    stop_gracefully,
)
from gunicorn_helpers import request as send
from psycopg.conninfo import conninfo_to_dict

import sessionstore as ss
from sessionstore import db
from sessionstore.contrib.django.checks import check_settings
from sessionstore.contrib.django.conf import Settings, database_dsn

EXAMPLE = ROOT / "examples" / "django_app"
POSTGRES = "django.db.backends.postgresql"
SPECIAL = "p@ss:w/o%rd 'q\" \\x=y#z"
"""A password with every character a URL or a conninfo string treats specially."""


def server_database(dsn: str) -> dict[str, Any]:
    """The test server as a Django ``DATABASES`` entry (from its libpq DSN)."""
    parts = conninfo_to_dict(dsn)
    return {
        "ENGINE": POSTGRES,
        "NAME": parts.get("dbname", "postgres"),
        "USER": parts.get("user", ""),
        "PASSWORD": parts.get("password", ""),
        "HOST": parts.get("host", ""),
        "PORT": parts.get("port", ""),
    }


def example_env(dsn: str, schema: str, store: str) -> dict[str, str]:
    """The environment of examples/django_app for the test server."""
    database = server_database(dsn)
    return {
        "DB_NAME": str(database["NAME"]),
        "DB_USER": str(database["USER"]),
        "DB_PASSWORD": str(database["PASSWORD"]),
        "DB_HOST": str(database["HOST"]),
        "DB_PORT": str(database["PORT"]),
        "SESSIONSTORE_SCHEMA": schema,
        "COUNTER_STORE": store,
        "DJANGO_SETTINGS_MODULE": "counterapp.settings",
    }


def run_python(
    args: list[str], env: dict[str, str], cwd: Path, extra_path: Path | None = None
) -> subprocess.Popen[str]:
    """Start ``python ARGS`` with the example project (and ``extra_path``) importable."""
    full = os.environ.copy()
    full.update(env)
    paths = [str(EXAMPLE), str(ROOT), *([str(extra_path)] if extra_path else [])]
    full["PYTHONPATH"] = os.pathsep.join([*paths, full.get("PYTHONPATH", "")])
    return subprocess.Popen(
        [sys.executable, *args],
        cwd=cwd,
        env=full,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc: subprocess.Popen[str], timeout: float = 60.0) -> tuple[int, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out + err


# ---------------------------------------------------------------- the DSN


@pytest.mark.parametrize(
    ("database", "expected"),
    [
        pytest.param(
            {"NAME": "app", "USER": "me", "HOST": "/var/run/postgresql", "PORT": "5433"},
            {"dbname": "app", "user": "me", "host": "/var/run/postgresql", "port": "5433"},
            id="socket-directory",
        ),
        pytest.param(
            {"NAME": "app", "USER": "me", "HOST": "db.example.com", "PORT": 6543},
            {"dbname": "app", "user": "me", "host": "db.example.com", "port": "6543"},
            id="hostname-int-port",
        ),
        pytest.param(
            {"NAME": "my app", "USER": "d@v:x", "PASSWORD": SPECIAL, "HOST": "10.0.0.5"},
            {"dbname": "my app", "user": "d@v:x", "password": SPECIAL, "host": "10.0.0.5"},
            id="special-characters",
        ),
        pytest.param(
            {
                "NAME": "app",
                "HOST": "db1",
                "PORT": "5433",
                "OPTIONS": {
                    "sslmode": "require",
                    "options": "-c statement_timeout=5000 -c lock_timeout=100",
                    "application_name": "shop web",
                    "connect_timeout": 7,
                    # Django's and psycopg's own options: not libpq parameters, left out.
                    "isolation_level": 1,
                    "server_side_binding": True,
                    "pool": {"min_size": 2},
                    "assume_role": "r",
                    "prepare_threshold": None,
                },
            },
            {
                "dbname": "app",
                "host": "db1",
                "port": "5433",
                "sslmode": "require",
                "options": "-c statement_timeout=5000 -c lock_timeout=100",
                "application_name": "shop web",
                "connect_timeout": "7",
            },
            id="options",
        ),
        pytest.param(
            {"NAME": None, "OPTIONS": {"service": "ignored-as-django-does"}},
            {"dbname": "postgres"},
            id="name-none",
        ),
        pytest.param(
            {"NAME": "", "OPTIONS": {"service": "prod", "passfile": "/etc/pg pass"}},
            {"service": "prod", "passfile": "/etc/pg pass"},
            id="service",
        ),
        pytest.param(
            {"NAME": "app", "USER": "", "PASSWORD": "", "HOST": "", "PORT": ""},
            {"dbname": "app"},
            id="empty-parts-left-out",
        ),
    ],
)
def test_dsn_from_databases(database: dict[str, Any], expected: dict[str, str]) -> None:
    dsn = database_dsn({"ENGINE": POSTGRES, **database})
    assert conninfo_to_dict(dsn) == expected
    # As sessionstore reads it: the Engine's URL, and the control connection's conninfo.
    url = db.parse_dsn(dsn)
    assert (url.username, url.password) == (expected.get("user"), expected.get("password"))
    control = conninfo_to_dict(db.libpq_conninfo(db.resolve_url(dsn)))
    for key, value in expected.items():
        assert control[key] == value, key
    if "password" in expected:
        assert SPECIAL not in repr(ss.StoreConfig("s", {}, dsn=dsn))


def test_dsn_from_databases_multihost() -> None:
    dsn = database_dsn({"ENGINE": POSTGRES, "NAME": "app", "HOST": "db1,db2", "PORT": "5433,5434"})
    assert conninfo_to_dict(dsn) == {"dbname": "app", "host": "db1,db2", "port": "5433,5434"}
    control = conninfo_to_dict(db.libpq_conninfo(db.resolve_url(dsn)))
    assert (control["host"], control["port"]) == ("db1,db2", "5433,5434")


def test_dsn_errors_name_what_is_wrong_and_never_the_password() -> None:
    base = {"ENGINE": POSTGRES, "NAME": "app", "PASSWORD": SPECIAL}
    with pytest.raises(ImproperlyConfigured, match=r"'sslmdoe'.*did you mean 'sslmode'") as bad:
        database_dsn({**base, "OPTIONS": {"sslmdoe": "require"}})
    assert SPECIAL not in str(bad.value)
    with pytest.raises(ImproperlyConfigured, match=r"needs a NAME or OPTIONS\['service'\]"):
        database_dsn({**base, "NAME": ""})
    with pytest.raises(ImproperlyConfigured, match="not in DATABASES"):
        Settings.from_value({"DATABASE": "other"}).database_dsn({"default": base})
    with pytest.raises(ImproperlyConfigured, match="needs PostgreSQL"):
        Settings().database_dsn({"default": {"ENGINE": "django.db.backends.sqlite3"}})


@pytest.fixture
def special_role(sessionstore_dsn: str, sessionstore_schema: str) -> Iterator[tuple[str, str]]:
    """A login role with special characters in its name and password, allowed the schema."""
    role, password = f"dj {uuid.uuid4().hex[:6]}@x:'y", SPECIAL
    engine = sa.create_engine(db.resolve_url(sessionstore_dsn), poolclass=sa.NullPool)
    quoted = '"' + role.replace('"', '""') + '"'
    with engine.begin() as conn:
        literal = "'" + password.replace("'", "''") + "'"
        conn.execute(sa.text(f"CREATE ROLE {quoted} LOGIN PASSWORD {literal}"))
        conn.execute(sa.text(f'GRANT USAGE ON SCHEMA "{sessionstore_schema}" TO {quoted}'))
        for kind in ("TABLES", "SEQUENCES"):
            conn.execute(
                sa.text(f'GRANT ALL ON ALL {kind} IN SCHEMA "{sessionstore_schema}" TO {quoted}')
            )
    try:
        yield role, password
    finally:
        with engine.begin() as conn:
            conn.execute(sa.text(f"DROP OWNED BY {quoted}"))
            conn.execute(sa.text(f"DROP ROLE {quoted}"))
        engine.dispose()


def test_dsn_from_databases_connects_to_the_server(
    sessionstore_dsn: str, sessionstore_schema: str, special_role: tuple[str, str]
) -> None:
    role, password = special_role
    database = {
        **server_database(sessionstore_dsn),
        "USER": role,
        "PASSWORD": password,
        "OPTIONS": {
            "options": "-c statement_timeout=5000",
            "application_name": "django shop",
            "sslmode": "prefer",
            "isolation_level": 1,  # Django's: left out
        },
    }
    dsn = database_dsn(database)
    query = (
        "SELECT current_user, current_database(), current_setting('statement_timeout'), "
        "current_setting('application_name')"
    )
    # The pool's connections (SQLAlchemy on psycopg), as a Store makes them.
    engine = db.create_engine(dsn, pool_size=1)
    try:
        with engine.connect() as conn:
            user, name, timeout, app_name = conn.execute(sa.text(query)).one()
            assert db.driver_connection(conn).info.password == password
    finally:
        engine.dispose()
    assert (user, name, timeout) == (role, database["NAME"], "5s")
    assert app_name == "django shop"  # the DSN's own application_name wins over the default
    # The control connection (psycopg directly, from the same URL).
    with psycopg.connect(db.libpq_conninfo(db.resolve_url(dsn))) as conn:
        assert conn.info.password == password
        row = conn.execute(query).fetchone()
        assert row is not None and row[:3] == (role, database["NAME"], "5s")
        assert row[3] == "django shop"
    # A Store over it, built the way get_store builds it.
    config = Settings.from_value(
        {"OPTIONS": {"db_schema": sessionstore_schema}, "STORES": {"c": {"template": {"n": 0}}}}
    )
    name_ = f"t{uuid.uuid4().hex[:10]}"
    options = {**config.store_options("c", dsn), "name": name_, "lock_timeout": 5.0}

    def increment(data: Any) -> bool:
        data["n"] += 1
        return True

    with ss.Store(**options) as store:
        with store.session("k") as s:
            s.update(increment)
        assert store.peek("k") == {"n": 1}


# ---------------------------------------------------------------- checks in this process

PG = {"default": {"ENGINE": POSTGRES, "NAME": "app", "HOST": "/run/pg", "PASSWORD": SPECIAL}}
STORE = {"template": {"count": 0}}


def schema_check(data: Any) -> bool:
    """A schema named by dotted path in the checks' settings."""
    return isinstance(data, dict)


STEPS = [ss.add_fields("v1", {"extra": 0})]


def ids(value: object, databases: dict[str, Any] = PG) -> list[str]:
    messages = check_settings(value, databases)
    for message in messages:
        assert SPECIAL not in f"{message.msg} {message.hint}"
    return [message.id or "" for message in messages]


def test_checks_accept_a_clean_configuration() -> None:
    here = __name__
    assert ids(None) == []  # no SESSIONSTORE at all
    assert ids({"STORES": {"counters": STORE}}) == []
    full = {
        "DATABASE": "default",
        "CONTROL_DSN": "host=/run/pg dbname=app",
        "OPTIONS": {"lock_timeout": 10, "on_lock_lost": "logging.debug"},
        "STORES": {
            "a": {
                **STORE,
                "schema": f"{here}.schema_check",
                "migrations": f"{here}.STEPS",
                "changed_callbacks": ["logging.info", print],
                "on_handoff_request": f"{here}.schema_check",
                "message_handler": f"{here}.schema_check",
                "on_save": "logging.info",
                "on_after_save": print,
            },
            "b": {**STORE, "dsn": "postgresql://u:p@other/db", "db_schema": "other"},
        },
    }
    assert ids(full) == []
    config = Settings.from_value(full)
    options = config.store_options("a", config.database_dsn(PG))
    assert options["schema"] is schema_check and options["migrations"] is STEPS
    assert options["changed_callbacks"][1] is print and options["control_dsn"]
    assert options["message_handler"] is schema_check and options["on_after_save"] is print
    assert options["on_save"] is logging.info
    assert options["name"] == "a" and conninfo_to_dict(options["dsn"])["host"] == "/run/pg"
    assert config.store_options("b", None)["dsn"] == "postgresql://u:p@other/db"
    # Every store has its own DSN: DATABASES is not needed at all.
    assert ids({"DSN": "postgresql://u@h/d", "STORES": {"a": STORE}}, {}) == []


@pytest.mark.parametrize(
    ("value", "databases", "expected", "text"),
    [
        pytest.param(
            {"STORES": {"a": STORE}},
            {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": "x.db"}},
            "sessionstore.E001",
            "not PostgreSQL",
            id="sqlite",
        ),
        pytest.param(
            {"DATABASE": "sessions", "STORES": {"a": STORE}},
            PG,
            "sessionstore.E001",
            "not in DATABASES",
            id="unknown-alias",
        ),
        pytest.param({"DATABSE": "x"}, PG, "sessionstore.E002", "did you mean", id="typo-key"),
        pytest.param({"STORES": ["a"]}, PG, "sessionstore.E002", "dict", id="stores-not-dict"),
        pytest.param(
            {"OPTIONS": {"name": "x"}}, PG, "sessionstore.E002", "per store", id="name-in-options"
        ),
        pytest.param(
            {"STORES": {"a": STORE}},
            {"default": {**PG["default"], "OPTIONS": {"sslmdoe": "x"}}},
            "sessionstore.E002",
            "libpq",
            id="bad-database-options",
        ),
        pytest.param(
            {"DSN": "mysql://u@h/d", "STORES": {"a": STORE, "b": STORE}},
            {},
            "sessionstore.E002",
            "not a PostgreSQL",
            id="bad-dsn",
        ),
        pytest.param(
            {"STORES": {"a": {**STORE, "lock_timeout": "5"}}},
            PG,
            "sessionstore.E003",
            "lock_timeout must be a number",
            id="wrong-type",
        ),
        pytest.param(
            {"STORES": {"a": {**STORE, "lock_duration": 10, "lock_refresh_interval": 10}}},
            PG,
            "sessionstore.E003",
            "must be less than lock_duration",
            id="bad-value",
        ),
        pytest.param(
            {"STORES": {"a": {**STORE, "db_schema": "pg_catalog"}}},
            PG,
            "sessionstore.E003",
            "system schema",
            id="system-schema",
        ),
        pytest.param(
            {"STORES": {"a": {**STORE, "lock_timout": 5}}},
            PG,
            "sessionstore.E003",
            "did you mean 'lock_timeout'",
            id="typo-option",
        ),
        pytest.param(
            {"STORES": {"a": {"schema": "json.loads"}}},
            PG,
            "sessionstore.E003",
            "needs a 'template'",
            id="no-template",
        ),
        pytest.param(
            {"STORES": {"a": {**STORE, "schema": "no_such_module.Player"}}},
            PG,
            "sessionstore.E003",
            "cannot import 'no_such_module.Player'",
            id="bad-dotted-path",
        ),
        pytest.param(
            {"STORES": {"a": {**STORE, "on_lock_lost": "sessionstore.__version__"}}},
            PG,
            "sessionstore.E003",
            "on_lock_lost",
            id="not-callable",
        ),
        pytest.param(
            {"STORES": {"a": {"template": {"x": float("nan")}}}},
            PG,
            "sessionstore.E003",
            "template is invalid",
            id="bad-template",
        ),
        pytest.param(
            {"STORES": {"a": STORE}},
            {"default": {**PG["default"], "PORT": 6432}},
            "sessionstore.W001",
            "port 6432",
            id="pgbouncer-port",
        ),
        pytest.param(
            {"STORES": {"a": STORE}},
            {"default": {**PG["default"], "DISABLE_SERVER_SIDE_CURSORS": True}},
            "sessionstore.W001",
            "DISABLE_SERVER_SIDE_CURSORS",
            id="server-side-cursors-off",
        ),
        pytest.param(
            {"DSN": "postgresql://u@pgbouncer:6432/app"},
            {},
            "sessionstore.W001",
            "port 6432",
            id="pgbouncer-dsn",
        ),
    ],
)
def test_checks_report_each_problem(
    value: Any, databases: dict[str, Any], expected: str, text: str
) -> None:
    messages = check_settings(value, databases)
    assert [m.id for m in messages] == [expected], messages
    assert text in messages[0].msg, messages[0].msg
    if expected == "sessionstore.W001":
        assert "session-mode" in (messages[0].hint or "")
        assert "CONTROL_DSN" in (messages[0].hint or "")


def test_checks_no_pooling_warning_with_a_control_dsn() -> None:
    bouncer = {"default": {**PG["default"], "PORT": "6432", "DISABLE_SERVER_SIDE_CURSORS": True}}
    assert ids({"CONTROL_DSN": "host=/run/pg dbname=app", "STORES": {"a": STORE}}, bouncer) == []
    per_store = {"a": {**STORE, "control_dsn": "host=/run/pg dbname=app"}, "b": STORE}
    messages = check_settings({"STORES": per_store}, bouncer)
    assert [m.id for m in messages] == ["sessionstore.W001"]
    assert "stores 'b'" in messages[0].msg


# ---------------------------------------------------------------- manage.py, for real

SQLITE_SETTINGS = """
from counterapp.settings import *  # noqa: F403

DATABASES = {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": "x.db"}}
"""


def test_manage_py_check_and_command(
    sessionstore_dsn: str, sessionstore_schema: str, store_name: str, tmp_path: Path
) -> None:
    """examples/django_app's manage.py: check passes, check on sqlite fails, the command runs."""
    env = example_env(sessionstore_dsn, sessionstore_schema, store_name)
    (tmp_path / "sqlite_db.py").write_text(SQLITE_SETTINGS)
    manage = str(EXAMPLE / "manage.py")
    # All at once: each is a Django start-up (about a second).
    procs = [
        run_python([manage, "check"], env, tmp_path),
        run_python([manage, "check", "--settings=sqlite_db"], env, tmp_path, tmp_path),
        run_python([manage, "sessionstore", "db", "current"], env, tmp_path),
    ]
    (check, check_sqlite, current) = [finish(proc) for proc in procs]

    code, output = check
    assert code == 0 and "System check identified no issues" in output, output
    code, output = check_sqlite
    assert code == 1 and "sessionstore.E001" in output and "not PostgreSQL" in output, output
    assert "Traceback" not in output, output
    code, output = current
    head = db.head_revision()
    assert code == 0 and f"schema {sessionstore_schema}: at revision {head}" in output, output


# ---------------------------------------------------------------- Django in this process

IN_PROCESS_DATABASES = {
    "sqlite": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"},
    "bouncer": {**PG["default"], "PORT": "6432", "DISABLE_SERVER_SIDE_CURSORS": True},
}


@pytest.fixture(scope="session")
def django_project(sessionstore_dsn: str, sessionstore_schema: str) -> dict[str, Any]:
    """Django configured in this process (once: settings are process-global); SESSIONSTORE.

    Its ``default`` database is the test server; ``sqlite`` and ``bouncer``
    (PgBouncer-like) aliases are there for the checks. Tests change
    ``SESSIONSTORE`` with ``override_settings``.
    """
    import django
    from django.conf import settings

    project = {
        "DATABASE": "default",
        "OPTIONS": {"db_schema": sessionstore_schema, "lock_timeout": 5.0},
        "STORES": {"counters": {"name": f"t{uuid.uuid4().hex[:12]}", "template": {"count": 0}}},
    }
    if not settings.configured:
        settings.configure(
            INSTALLED_APPS=["sessionstore.contrib.django"],
            DATABASES={"default": server_database(sessionstore_dsn), **IN_PROCESS_DATABASES},
            SESSIONSTORE=project,
            USE_TZ=True,
        )
        django.setup()
    assert "sessionstore" in {app.label for app in django.apps.apps.get_app_configs()}
    return project


def call(*args: str, **options: Any) -> tuple[str, str]:
    """``call_command(*args)``: its stdout and stderr."""
    import io

    from django.core.management import call_command

    out, err = io.StringIO(), io.StringIO()
    call_command(*args, stdout=out, stderr=err, **options)
    return out.getvalue(), err.getvalue()


@pytest.mark.parametrize(
    ("change", "expected", "text"),
    [
        pytest.param({}, "", "no issues", id="clean"),
        pytest.param({"DATABASE": "sqlite"}, "sessionstore.E001", "not PostgreSQL", id="sqlite"),
        pytest.param(
            {"STORES": {"counters": {"template": {}, "pool_size": 0}}},
            "sessionstore.E003",
            "pool_size",
            id="bad-option",
        ),
        pytest.param({"DATABASE": "bouncer"}, "sessionstore.W001", "session-mode", id="pgbouncer"),
    ],
)
def test_check_command(
    django_project: dict[str, Any], change: dict[str, Any], expected: str, text: str
) -> None:
    from django.core.management.base import SystemCheckError
    from django.test import override_settings

    with override_settings(SESSIONSTORE={**django_project, **change}):
        if expected.startswith("sessionstore.E"):
            with pytest.raises(SystemCheckError) as failed:
                call("check")
            output = str(failed.value)
        else:
            out, err = call("check")
            output = out + err
    assert (expected or "System check identified no issues") in output, output
    assert text in output, output


def test_sessionstore_command(
    django_project: dict[str, Any], sessionstore_dsn: str, sessionstore_schema: str
) -> None:
    from django.core.management.base import CommandError
    from django.test import override_settings

    head = db.head_revision()
    out, _ = call("sessionstore", "db", "current")
    assert f"schema {sessionstore_schema}: at revision {head}" in out
    outputs = [out]

    fresh = f"t_{uuid.uuid4().hex[:8]}"
    other = {"name": "other", "template": {}, "db_schema": fresh}
    two_schemas = {**django_project, "STORES": {**django_project["STORES"], "other": other}}
    try:
        with override_settings(SESSIONSTORE=two_schemas):
            with pytest.raises(CommandError) as failed:
                call("sessionstore", "--store", "other", "db", "current")
            assert failed.value.returncode == 1  # "not created", as the CLI exits
            # A command that takes --schema runs once per schema the stores use.
            out, _ = call("sessionstore", "db", "upgrade")
            assert f"schema {sessionstore_schema}: at revision {head}" in out
            assert f"schema {fresh}: at revision {head}" in out
            outputs.append(out)
            out, _ = call("sessionstore", "--store", "other", "db", "current")
            assert f"schema {fresh}: at revision {head}" in out
            assert sessionstore_schema not in out
            # Options given on the command line win over the settings.
            args = ("--store", "other", "db", "current", "--schema", sessionstore_schema)
            out, _ = call("sessionstore", *args)
            assert f"schema {sessionstore_schema}: at revision {head}" in out
            assert fresh not in out
    finally:
        engine = sa.create_engine(db.resolve_url(sessionstore_dsn), poolclass=sa.NullPool)
        with engine.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{fresh}" CASCADE'))
        engine.dispose()
        db.clear_schema_cache()
    password = server_database(sessionstore_dsn)["PASSWORD"]
    assert not password or not any(password in out for out in outputs)

    with pytest.raises(CommandError, match="no store 'nope'"):
        call("sessionstore", "--store", "nope", "db", "current")
    with pytest.raises(CommandError, match="give a sessionstore command"):
        call("sessionstore")
    with pytest.raises(CommandError) as usage:  # the CLI's own usage error (exit 2)
        call("sessionstore", "db", "frobnicate")
    assert usage.value.returncode == 2
    out, _ = call("sessionstore", "db", "current", "--help")  # the CLI's help
    assert "--schema" in out and "--dsn" in out


def test_get_store_in_process(django_project: dict[str, Any]) -> None:
    from django.core.exceptions import ImproperlyConfigured as Improper
    from django.test import override_settings

    from sessionstore.contrib.django import close_stores, get_store, prepare

    prepare()
    store = get_store("counters")
    try:
        assert get_store("counters") is store
        assert store.name == django_project["STORES"]["counters"]["name"]
        assert store.config.db_schema == django_project["OPTIONS"]["db_schema"]
        assert store.config.lock_timeout == 5.0
        with store.session("in-process") as s:
            s.update(lambda data: data.update(count=data["count"] + 1) is None)
        assert store.peek("in-process") == {"count": 1}
        with pytest.raises(Improper, match=r"no store 'counter'.*did you mean 'counters'"):
            get_store("counter")
        # override_settings of SESSIONSTORE: the stores are closed and made anew.
        changed = {**django_project, "OPTIONS": {**django_project["OPTIONS"], "lock_timeout": 2.0}}
        with override_settings(SESSIONSTORE=changed):
            with pytest.raises(ss.StoreClosedError):
                store.peek("in-process")
            assert get_store("counters").config.lock_timeout == 2.0
        assert get_store("counters").config.lock_timeout == 5.0
    finally:
        close_stores()


# ---------------------------------------------------------------- get_store

LAZY_SCRIPT = """
import json, os, sys, threading

import django
from django.core import checks

import counterapp.wsgi  # django.setup(), as gunicorn --preload does in its master
from sessionstore import _process
from sessionstore.contrib.django import close_stores, get_store

out = {}
assert checks.run_checks(tags=["sessionstore"]) == []
out["stores_after_setup"] = len(_process._open)

barrier = threading.Barrier(8)
got = []
def first_call():
    barrier.wait(10)
    got.append(get_store("counters"))
threads = [threading.Thread(target=first_call) for _ in range(8)]
for t in threads: t.start()
for t in threads: t.join(30)
store = got[0]
out["distinct"] = len({id(s) for s in got})
out["stores_after_get"] = len(_process._open)
out["again"] = get_store("counters") is store
out["store_name"] = store.name

def inc(data):
    data["count"] += 1
    return True

with store.session("lazy") as s:
    s.update(inc)
out["parent_holder"] = store.holder

read, write = os.pipe()
pid = os.fork()
if pid == 0:
    child = {}
    try:
        mine = get_store("counters")
        child["same_object"] = mine is store
        with mine.session("lazy") as s:
            s.update(inc)
        child["holder"] = mine.holder
        close_stores()
        child["fresh_after_close"] = get_store("counters") is not mine
        close_stores()
    except BaseException as exc:
        child["error"] = repr(exc)
    os.write(write, json.dumps(child).encode())
    os._exit(0)
os.close(write)
with os.fdopen(read) as pipe:
    out["child"] = json.loads(pipe.read())
os.waitpid(pid, 0)
out["peek"] = store.peek("lazy")["count"]
print(json.dumps(out))
"""


def test_get_store_is_lazy_and_per_process(
    sessionstore_dsn: str, sessionstore_schema: str, store_name: str, tmp_path: Path
) -> None:
    script = tmp_path / "lazy.py"
    script.write_text(LAZY_SCRIPT)
    env = example_env(sessionstore_dsn, sessionstore_schema, store_name)
    code, output = finish(run_python([str(script)], env, tmp_path))
    assert code == 0, output
    (line,) = [line for line in output.splitlines() if line.startswith('{"stores_after_setup"')]
    out = json.loads(line)
    assert out["stores_after_setup"] == 0  # settings, checks and the WSGI app made no Store
    assert out["distinct"] == 1 and out["stores_after_get"] == 1 and out["again"] is True
    assert out["store_name"] == store_name  # the "name" option of the settings
    child = out["child"]
    assert "error" not in child, child
    # The child kept the cached Store, which sessionstore reset: a holder of its own.
    assert child["same_object"] is True and child["holder"] != out["parent_holder"]
    assert child["fresh_after_close"] is True
    assert out["peek"] == 2  # the parent's increment and the child's


# ---------------------------------------------------------------- gunicorn

CLIENTS = 8
REQUESTS_PER_CLIENT = 40
HOT_KEYS = [f"hot{i}" for i in range(3)]
DISTINCT_KEYS = [f"key{i}" for i in range(30)]


def plan(client: int) -> list[str]:
    """Client ``client``'s keys: every other request on a hot key, the rest spread on 30."""
    keys = []
    for n in range(REQUESTS_PER_CLIENT):
        if n % 2 == 0:
            keys.append(HOT_KEYS[(client + n // 2) % len(HOT_KEYS)])
        else:
            keys.append(DISTINCT_KEYS[(client * REQUESTS_PER_CLIENT + n) // 2 % len(DISTINCT_KEYS)])
    return keys


@pytest.fixture
def servers() -> Iterator[list[Server]]:
    started: list[Server] = []
    yield started
    for server in started:
        shutdown(server)


@pytest.mark.parametrize(("workers", "options"), EXAMPLE_MODES)
def test_example_app_under_gunicorn(
    servers: list[Server],
    sessionstore_dsn: str,
    sessionstore_schema: str,
    store_name: str,
    tmp_path: Path,
    workers: int,
    options: list[str],
    request: pytest.FixtureRequest,
) -> None:
    env = example_env(sessionstore_dsn, sessionstore_schema, store_name)
    server = start(
        "counterapp.wsgi:application",
        "--workers",
        str(workers),
        *options,
        env=env,
        pythonpath=[EXAMPLE],
        cwd=tmp_path,
    )
    servers.append(server)
    wait_until(lambda: booted_workers(server) >= workers, 30.0, f"{workers} workers to boot")
    # The app logs once it is imported: in the master with --preload, else in each worker.
    apps = 1 if "--preload" in options else workers
    wait_until(lambda: server.log().count("counterapp ready") >= apps, 30.0, f"{apps} app(s)")
    wait_until(lambda: send(server, "GET", "/health").status == 200, 30.0, "GET /health")

    plans = [plan(client) for client in range(CLIENTS)]
    results: list[list[tuple[str, Response, float]]] = [[] for _ in range(CLIENTS)]
    barrier = threading.Barrier(CLIENTS)

    def client(index: int) -> None:
        barrier.wait(10.0)
        for key in plans[index]:
            began = time.perf_counter()
            answer = send(server, "POST", f"/count/{key}")
            results[index].append((key, answer, time.perf_counter() - began))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
    began = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60.0)
    assert not any(t.is_alive() for t in threads), "clients still running after 60 s"
    elapsed = time.monotonic() - began

    done = [entry for per_client in results for entry in per_client]
    failed = [(key, r.status, r.error) for key, r, _ in done if not 200 <= r.status < 300]
    latencies = sorted(seconds for _, _, seconds in done)
    p50 = statistics.median(latencies) * 1000
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000
    mode = request.node.callspec.id
    print(
        f"\n[django gunicorn {mode}] {len(done)} requests, {len(failed)} non-2xx, "
        f"p50 {p50:.1f} ms, p99 {p99:.1f} ms, {len(done) / elapsed:.0f} req/s over {elapsed:.2f} s"
    )
    assert len(done) == CLIENTS * REQUESTS_PER_CLIENT
    assert not failed, f"{len(failed)} requests failed, e.g. {failed[:3]}"

    # Each key's increments produced 1..N once each: nothing lost, nothing doubled.
    acknowledged = Counter(key for key, _, _ in done)
    assert set(acknowledged) == {*HOT_KEYS, *DISTINCT_KEYS}
    for key, count in acknowledged.items():
        produced = sorted(r.body["count"] for k, r, _ in done if k == key)
        assert produced == list(range(1, count + 1)), (key, produced)
    assert len({r.body["pid"] for _, r, _ in done}) >= 2, "one worker served everything"
    # GET reads the saved count with peek (the last increment is durable already).
    assert send(server, "GET", f"/count/{HOT_KEYS[0]}").body["count"] == acknowledged[HOT_KEYS[0]]

    # A graceful stop: every worker closes its Store at exit, no lease is left.
    stop_gracefully(server, sessionstore_dsn, sessionstore_schema, store_name)
    with ss.Store(
        store_name, {"count": 0}, dsn=sessionstore_dsn, db_schema=sessionstore_schema
    ) as mine:
        stored = {key: (mine.peek(key) or {"count": 0})["count"] for key in acknowledged}
    assert stored == dict(acknowledged)
    log = server.log()
    for bad in ("Traceback", "[ERROR]", "[CRITICAL]", "WORKER TIMEOUT"):
        assert bad not in log, f"gunicorn logged {bad!r}"

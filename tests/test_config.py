"""StoreConfig: every Store option checked before any I/O, and the README's table of them."""

from __future__ import annotations

import dataclasses
import inspect
import math
import re
import reprlib
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

import sessionstore as ss
from sessionstore.config import StoreConfig, configuration_table

TEMPLATE = {"coins": 0, "inventory": []}
README = Path(__file__).resolve().parent.parent / "README.md"

SECONDS = [
    "lock_duration",
    "lock_refresh_interval",
    "lock_timeout",
    "autosave_interval",
    "takeover_grace",
    "retry_timeout",
    "retain_for",
    "janitor_interval",
]
INTS = [
    "max_document_size",
    "compression_level",
    "compress_threshold",
    "inline_threshold",
    "shard_size",
    "stream_threshold",
    "retain_versions",
    "peek_cache_size",
    "view_cache_size",
    "save_batch_size",
    "pool_size",
]


def make(**options: Any) -> StoreConfig:
    settings: dict[str, Any] = {"name": "players", "template": TEMPLATE, **options}
    return StoreConfig(**settings)


def _step(name: str) -> ss.MigrationStep:
    return ss.transform(name, lambda d: d)


def _cyclic() -> Any:
    data: dict[str, Any] = {"coins": 0}
    data["self"] = data
    return data


def _deep(levels: int) -> Any:
    data: Any = 0
    for _ in range(levels):
        data = [data]
    return data


def _id(options: Any) -> str:
    """A short test id: the options, each value shortened."""
    if not isinstance(options, dict):
        return reprlib.repr(options)
    return ",".join(f"{name}={reprlib.repr(value)}" for name, value in options.items())


# -- what is accepted ------------------------------------------------------------------


def test_defaults_are_the_documented_ones() -> None:
    config = make()
    assert (config.lock_duration, config.lock_refresh_interval, config.lock_timeout) == (
        90.0,
        30.0,
        30.0,
    )
    assert config.autosave_interval == 300.0
    assert config.db_schema == "sessionstore"
    assert config.max_document_size == 512 * 1024 * 1024
    assert (config.compression_level, config.compress_threshold) == (3, 1024)
    assert (config.inline_threshold, config.shard_size) == (256 * 1024, 1024 * 1024)
    assert config.stream_threshold == 8 * 1024 * 1024
    assert (config.save_batch_size, config.pool_size, config.retain_versions) == (500, 10, 10)
    assert (config.retain_for, config.janitor_interval) == (86400.0, 60.0)
    assert (config.peek_cache_size, config.view_cache_size) == (1024, 256)
    assert (config.control_dsn, config.dsn) == (None, None)
    assert (config.instant_takeover, config.takeover_grace, config.retry_timeout) == (
        True,
        2.0,
        10.0,
    )
    assert (config.migrations, config.changed_callbacks) == ((), ())


def test_store_signature_matches_the_config() -> None:
    """Every explicit Store option is a StoreConfig field with the same default."""
    fields = {f.name: f for f in dataclasses.fields(StoreConfig)}
    params = [
        p
        for name, p in inspect.signature(ss.Store.__init__).parameters.items()
        if name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
    ]
    for param in params:
        assert param.name in fields, f"Store option {param.name} is not a StoreConfig field"
        default = fields[param.name].default
        if param.default is inspect.Parameter.empty:
            assert default is dataclasses.MISSING, param.name
        else:
            assert param.default == default, param.name
    if not any(p.kind is p.VAR_KEYWORD for p in inspect.signature(ss.Store).parameters.values()):
        assert {p.name for p in params} == set(fields)


def test_seconds_become_floats_and_iterables_tuples() -> None:
    def callback(key: str, new: Any, old: Any) -> None:
        return None

    config = make(
        lock_duration=10,
        lock_refresh_interval=Fraction(1, 2),
        lock_timeout=0,
        retain_for=0,
        migrations=[_step("a"), _step("b")],
        changed_callbacks=[callback],
    )
    assert type(config.lock_duration) is float and config.lock_duration == 10.0
    assert config.lock_refresh_interval == 0.5
    assert type(config.lock_timeout) is float
    assert isinstance(config.migrations, tuple) and len(config.migrations) == 2
    assert config.changed_callbacks == (callback,)
    assert make(changed_callbacks=iter([callback])).changed_callbacks == (callback,)


@pytest.mark.parametrize(
    "options",
    [
        {"view_cache_size": 0},
        {"peek_cache_size": 0},
        {"compression_level": -5},
        {"compression_level": 22},
        {"compression_level": 0},
        {"compress_threshold": 0, "inline_threshold": 0, "stream_threshold": 0},
        {"takeover_grace": 0, "retry_timeout": 0, "lock_timeout": 0},
        {"db_schema": "public"},
        {"db_schema": "my_app_1"},
        {"name": "a" * 64},
        {"name": "a.b:c-d_e"},
        {"dsn": "postgresql://u:pw@h/db"},
        {"dsn": "host=/tmp dbname=app user=me"},
        {"dsn": sa.make_url("postgresql+psycopg2://u@h/db")},
        {"control_dsn": "postgresql://u@direct/db"},
        {"instant_takeover": False},
        {"schema": lambda data: True},
        {"schema": None},
        {"lock_duration": 1e9, "lock_refresh_interval": 1},
        {"max_document_size": 2**63 - 1},
    ],
    ids=_id,
)
def test_accepts(options: dict[str, Any]) -> None:
    config = make(**options)
    for name, value in options.items():
        if not callable(value):
            assert getattr(config, name) == value


def test_accepts_a_psycopg_engine_only() -> None:
    engine = sa.create_engine("postgresql+psycopg://u:pw@localhost/db")
    try:
        assert make(dsn=engine).dsn is engine
    finally:
        engine.dispose()
    other = sa.create_engine("sqlite://")
    try:
        with pytest.raises(ss.InvalidArgumentError, match="psycopg"):
            make(dsn=other)
    finally:
        other.dispose()


def test_is_frozen_and_replace_checks_again() -> None:
    config = make()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.lock_timeout = 1.0  # type: ignore[misc]
    assert dataclasses.replace(config, lock_timeout=1).lock_timeout == 1.0
    with pytest.raises(ss.InvalidArgumentError, match="lock_timeout"):
        dataclasses.replace(config, lock_timeout=math.nan)


def test_repr_hides_the_password() -> None:
    config = make(
        dsn="postgresql://u:hunter2pw@h/db?options=-c%20statement_timeout%3D5000",
        control_dsn="host=h user=u password=hunter2pw",
    )
    text = repr(config)
    assert "hunter2pw" not in text
    assert "statement_timeout=5000" in text
    assert "players" in text


# -- what is refused -------------------------------------------------------------------

NAN, INF = float("nan"), float("inf")
TYPE, VALUE = ss.ArgumentTypeError, ss.InvalidArgumentError

BAD: list[tuple[dict[str, Any], type[Exception], str]] = [
    *[({name: NAN}, VALUE, name) for name in SECONDS],
    *[({name: INF}, VALUE, name) for name in SECONDS],
    *[({name: -INF}, VALUE, name) for name in SECONDS],
    *[({name: -1}, VALUE, name) for name in SECONDS],
    *[({name: 10**400}, VALUE, name) for name in SECONDS],  # finite, but no float
    *[({name: True}, TYPE, name) for name in SECONDS],
    *[({name: "5"}, TYPE, name) for name in SECONDS],
    *[({name: None}, TYPE, name) for name in SECONDS],
    *[({name: 1.5}, TYPE, name) for name in INTS],
    *[({name: 2.0}, TYPE, name) for name in INTS],
    *[({name: True}, TYPE, name) for name in INTS],
    *[({name: "10"}, TYPE, name) for name in INTS],
    *[({name: NAN}, TYPE, name) for name in INTS],
    *[({name: 2**63}, VALUE, name) for name in INTS],
    *[({name: -1}, VALUE, name) for name in INTS if name != "compression_level"],
    ({"lock_duration": 0}, VALUE, "lock_duration"),
    ({"lock_refresh_interval": 0}, VALUE, "lock_refresh_interval"),
    ({"autosave_interval": 0}, VALUE, "autosave_interval"),
    ({"janitor_interval": 0}, VALUE, "janitor_interval"),
    ({"lock_duration": 1e10}, VALUE, "lock_duration"),
    ({"lock_refresh_interval": 90}, VALUE, "lock_refresh_interval"),
    ({"lock_refresh_interval": 100}, VALUE, "lock_refresh_interval"),
    ({"lock_duration": 5, "lock_refresh_interval": 5.0}, VALUE, "lock_refresh_interval"),
    ({"max_document_size": 0}, VALUE, "max_document_size"),
    ({"shard_size": 0}, VALUE, "shard_size"),
    ({"shard_size": 2**30}, VALUE, "shard_size"),
    ({"save_batch_size": 0}, VALUE, "save_batch_size"),
    ({"pool_size": 0}, VALUE, "pool_size"),
    ({"retain_versions": 0}, VALUE, "retain_versions"),
    ({"compression_level": 23}, VALUE, "compression_level"),
    ({"compression_level": -(2**17) - 1}, VALUE, "compression_level"),
    ({"view_cache_size": -1}, VALUE, "view_cache_size"),
    ({"peek_cache_size": -1}, VALUE, "peek_cache_size"),
    ({"db_schema": "pg_catalog"}, VALUE, "pg_catalog"),
    ({"db_schema": "information_schema"}, VALUE, "information_schema"),
    ({"db_schema": "pg_toast"}, VALUE, "pg_toast"),
    ({"db_schema": "pg_temp_1"}, VALUE, "pg_temp_1"),
    ({"db_schema": "pg_anything"}, VALUE, "reserved"),
    ({"db_schema": "Public"}, VALUE, "db_schema"),
    ({"db_schema": ""}, VALUE, "db_schema"),
    ({"db_schema": "a;drop"}, VALUE, "db_schema"),
    ({"db_schema": "a" * 64}, VALUE, "db_schema"),
    ({"db_schema": None}, TYPE, "db_schema"),
    ({"db_schema": 5}, TYPE, "db_schema"),
    ({"name": ""}, VALUE, "name"),
    ({"name": "a" * 65}, VALUE, "name"),
    ({"name": "a b"}, VALUE, "name"),
    ({"name": "players\n"}, VALUE, "name"),
    ({"name": "é"}, VALUE, "name"),
    ({"name": "a/b"}, VALUE, "name"),
    ({"name": None}, TYPE, "name"),
    ({"name": 5}, TYPE, "name"),
    ({"name": b"players"}, TYPE, "name"),
    ({"instant_takeover": 1}, TYPE, "instant_takeover"),
    ({"instant_takeover": "yes"}, TYPE, "instant_takeover"),
    ({"instant_takeover": None}, TYPE, "instant_takeover"),
    ({"on_lock_lost": 5}, TYPE, "on_lock_lost"),
    ({"on_handoff_request": "no"}, TYPE, "on_handoff_request"),
    ({"import_legacy_data": {}}, TYPE, "import_legacy_data"),
    ({"changed_callbacks": print}, TYPE, "changed_callbacks"),
    ({"changed_callbacks": [print, 1]}, TYPE, r"changed_callbacks\[1\]"),
    ({"changed_callbacks": "abc"}, TYPE, "changed_callbacks"),
    ({"changed_callbacks": None}, TYPE, "changed_callbacks"),
    ({"migrations": "abc"}, TYPE, "migrations"),
    ({"migrations": None}, TYPE, "migrations"),
    ({"migrations": [lambda d: d]}, TYPE, "migrations"),
    ({"migrations": [_step("a"), _step("a")]}, VALUE, "used twice"),
    ({"schema": 5}, TYPE, "schema"),
    ({"schema": "int"}, TYPE, "schema"),
    ({"dsn": 5}, TYPE, "dsn"),
    ({"dsn": b"postgresql://h/db"}, TYPE, "dsn"),
    ({"dsn": ""}, VALUE, "DSN"),
    ({"dsn": "nonsense"}, VALUE, "DSN"),
    ({"dsn": "mysql://u@h/db"}, VALUE, "PostgreSQL"),
    ({"dsn": "postgresql://u@h:port/db"}, VALUE, "DSN"),
    ({"dsn": "host=h password='unterminated"}, VALUE, "connection string"),
    ({"control_dsn": 5}, TYPE, "control_dsn"),
    ({"control_dsn": "sqlite:///x"}, VALUE, "PostgreSQL"),
    ({"template": _cyclic()}, ss.InvalidDataError, "cycle"),
    ({"template": _deep(300)}, ss.InvalidDataError, "deeper than 255"),
    ({"template": {"x": NAN}}, ss.InvalidDataError, "template"),
    ({"template": {1: 2}}, ss.InvalidDataError, "template"),
    ({"template": {"x": "y" * 100}, "max_document_size": 50}, ss.InvalidDataError, "50"),
]


@pytest.mark.parametrize(("options", "error", "match"), BAD, ids=_id)
def test_refuses(options: dict[str, Any], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match) as info:
        make(**options)
    assert isinstance(info.value, ss.SessionStoreError)
    if error is TYPE:
        assert isinstance(info.value, TypeError)
    else:
        assert isinstance(info.value, ValueError)
    assert not isinstance(info.value, RecursionError)


@pytest.mark.parametrize(
    "dsn",
    [
        "host=x password=my s3cretpw user=u",
        "host=x password='s3cretpw user=u",
        "host=x password=s3cretpw' user",
        "u:s3cretpw@host/db",
        "postgresql://u:s3cretpw@h:notaport/db",
        "mysql://u:s3cretpw@h/db",
    ],
)
def test_dsn_errors_never_quote_the_password(dsn: str) -> None:
    with pytest.raises(ss.InvalidArgumentError) as info:
        make(dsn=dsn)
    error: BaseException | None = info.value
    while error is not None:  # nor does anything chained to it
        assert "s3cretpw" not in str(error)
        error = error.__cause__ or error.__context__


def test_a_message_names_the_option_and_the_value() -> None:
    with pytest.raises(ss.InvalidArgumentError) as info:
        make(lock_timeout=NAN)
    assert "lock_timeout" in str(info.value) and "nan" in str(info.value)
    with pytest.raises(ss.ArgumentTypeError) as type_info:
        make(max_document_size=1.5)
    assert "max_document_size" in str(type_info.value) and "1.5" in str(type_info.value)


# -- the README ------------------------------------------------------------------------


def _readme_table() -> str:
    text = README.read_text(encoding="utf-8")
    section = text.split("\n## Configuration\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    return "\n".join(rows) + "\n"


def test_readme_lists_every_option_with_its_default() -> None:
    table = _readme_table()
    names = re.findall(r"^\| `(\w+)` \|", table, flags=re.MULTILINE)
    assert names == [f.name for f in dataclasses.fields(StoreConfig)]
    assert table == configuration_table(), (
        "README.md's configuration table is out of date: "
        "replace it with the output of `python -m sessionstore.config`"
    )

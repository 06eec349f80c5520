"""Bad input never gets past the API raw (docs/api.md, "Bad arguments").

A bad argument raises a ``ValueError``/``TypeError`` that is also a
``SessionStoreError``, at the call and before any I/O; data that is not
JSON (cycles, nesting deeper than 255) raises ``InvalidDataError``, never a
``RecursionError``; no SQLAlchemy or psycopg exception escapes, and no
message quotes a password. Each case also checks that nothing changed.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import psycopg
import psycopg.errors as pe
import pytest
import sqlalchemy as sa
import sqlalchemy.exc as sa_exc
from psycopg.conninfo import conninfo_to_dict

import sessionstore as ss
from sessionstore import _args, db
from sessionstore.frozen import MAX_DEPTH, decode, encode, encode_with_copy, freeze, freeze_json
from sessionstore.retry import RetryPolicy, is_transient, with_retries

TYPE, VALUE = ss.ArgumentTypeError, ss.InvalidArgumentError
NAN, INF = float("nan"), float("inf")
UNREACHABLE = "postgresql://u:s3cretpw@127.0.0.1:1/db"  # nothing listens on port 1


def nested(levels: int, leaf: Any = 0) -> Any:
    """``leaf`` inside ``levels`` nested lists (so at level ``levels + 1``)."""
    data = leaf
    for _ in range(levels):
        data = [data]
    return data


def cyclic() -> Any:
    data: dict[str, Any] = {"coins": 1, "inventory": []}
    data["inventory"].append(data)
    return data


def assert_input_error(exc: BaseException, kind: type[BaseException]) -> None:
    """``exc`` is ``kind``, a SessionStoreError, and a ValueError or TypeError as ``kind`` says."""
    assert isinstance(exc, kind), repr(exc)
    assert isinstance(exc, ss.SessionStoreError)
    assert isinstance(exc, ValueError | TypeError)
    if issubclass(kind, TYPE):
        assert isinstance(exc, TypeError)
    if issubclass(kind, VALUE):
        assert isinstance(exc, ValueError)


def chain(exc: BaseException | None) -> Iterator[BaseException]:
    while exc is not None:
        yield exc
        exc = exc.__cause__ or exc.__context__


# -- the validators (sessionstore._args) ----------------------------------------------------


@pytest.mark.parametrize(
    ("value", "error"),
    [
        *[(0, VALUE), (-1, VALUE), (2**63, VALUE), (2**70, VALUE)],
        *[(True, TYPE), (False, TYPE), (1.0, TYPE), (1.5, TYPE), ("10", TYPE), (None, TYPE)],
        (NAN, TYPE),
    ],
    ids=repr,
)
def test_check_limit_refuses(value: Any, error: type[Exception]) -> None:
    with pytest.raises(error, match="limit") as info:
        _args.check_limit(value)
    assert_input_error(info.value, error)


def test_check_limit_accepts() -> None:
    assert _args.check_limit(1) == 1
    assert _args.check_limit(2**63 - 1) == 2**63 - 1


@pytest.mark.parametrize("value", [1.9, 1.0, "1", b"1", None, True, False, NAN], ids=repr)
def test_check_version_refuses_what_is_not_an_int(value: Any) -> None:
    with pytest.raises(TYPE, match="version") as info:
        _args.check_version(value)
    assert_input_error(info.value, TYPE)


@pytest.mark.parametrize("value", [0, -1, 2**63, 2**70])
def test_check_version_out_of_range_is_no_version(value: int) -> None:
    with pytest.raises(ss.VersionNotFoundError, match="store 'x' key 'k' has no version"):
        _args.check_version(value, "store 'x' key 'k'")


def test_check_version_accepts() -> None:
    assert _args.check_version(1) == 1
    assert _args.check_version(2**63 - 1) == 2**63 - 1


@pytest.mark.parametrize(
    ("value", "error"),
    [
        *[("garbage", TYPE), (5, TYPE), (5.0, TYPE), (datetime(2024, 1, 1).date(), TYPE)],
        *[(datetime(2024, 1, 1), VALUE), (datetime.now(), VALUE)],
    ],
    ids=repr,
)
def test_check_timestamp_refuses(value: Any, error: type[Exception]) -> None:
    with pytest.raises(error, match="since") as info:
        _args.check_timestamp(value, "since")
    assert_input_error(info.value, error)


def test_check_timestamp_accepts() -> None:
    aware = datetime(2024, 1, 1, tzinfo=timezone(timedelta(hours=2)))
    assert _args.check_timestamp(aware, "since") is aware
    assert _args.check_timestamp(None, "since") is None


@pytest.mark.parametrize(
    ("value", "error"),
    [
        *[(NAN, VALUE), (INF, VALUE), (-INF, VALUE), (-1, VALUE), (-0.001, VALUE)],
        *[(1e10, VALUE), (10**400, VALUE)],
        *[(True, TYPE), ("1", TYPE), (None, TYPE), (b"1", TYPE)],
    ],
    ids=repr,
)
def test_check_seconds_refuses(value: Any, error: type[Exception]) -> None:
    with pytest.raises(error, match="max_age") as info:
        _args.check_seconds(value, "max_age")
    assert_input_error(info.value, error)


def test_check_seconds_accepts() -> None:
    assert _args.check_seconds(0, "t") == 0.0 and type(_args.check_seconds(0, "t")) is float
    assert _args.check_seconds(None, "t", allow_none=True) is None
    assert _args.check_seconds(2.5, "t", minimum=2.5) == 2.5
    with pytest.raises(VALUE):
        _args.check_seconds(2.5, "t", minimum=2.5, exclusive=True)
    with pytest.raises(VALUE):
        _args.check_seconds(0, "t", exclusive=True)


def test_check_positive_int_and_bool() -> None:
    assert _args.check_positive_int(3, "n") == 3
    for bad, error in ((0, VALUE), (True, TYPE), (3.0, TYPE), (11, VALUE)):
        with pytest.raises(error, match="n"):
            _args.check_positive_int(bad, "n", maximum=10)
    assert _args.check_bool(False, "flag") is False
    for not_bool in (0, 1, "true", None):
        with pytest.raises(TYPE, match="flag"):
            _args.check_bool(not_bool, "flag")


# -- Store calls: bad arguments change nothing ----------------------------------------------


@pytest.fixture
def saved(store: ss.Store) -> ss.Store:
    """``store`` with key "k" loaded and saved twice (versions 1 and 2), coins=2."""
    store.load("k")
    for _ in range(2):
        store.update("k", lambda d: d.__setitem__("coins", d["coins"] + 1) or True)
        store.save("k")
    return store


def assert_unchanged(store: ss.Store) -> None:
    assert store.get("k") == {"coins": 2, "inventory": []}
    assert store.is_saved("k")
    assert store.peek("k") == {"coins": 2, "inventory": []}
    assert [v.version for v in store.list_versions("k")] == [2, 1]


NAIVE = datetime(2024, 1, 1)

# The store is typed Any: these calls pass wrong types on purpose.
BAD_CALLS: dict[str, tuple[Callable[[Any], Any], type[Exception]]] = {
    "list_versions limit=2**70": (lambda s: s.list_versions("k", limit=2**70), VALUE),
    "list_versions limit=2**63": (lambda s: s.list_versions("k", limit=2**63), VALUE),
    "list_versions limit=True": (lambda s: s.list_versions("k", limit=True), TYPE),
    "list_versions limit=0": (lambda s: s.list_versions("k", limit=0), VALUE),
    "list_versions limit=-5": (lambda s: s.list_versions("k", limit=-5), VALUE),
    "list_versions limit=2.0": (lambda s: s.list_versions("k", limit=2.0), TYPE),
    "list_versions limit='10'": (lambda s: s.list_versions("k", limit="10"), TYPE),
    "list_versions limit=None": (lambda s: s.list_versions("k", limit=None), TYPE),
    "list_versions since='garbage'": (lambda s: s.list_versions("k", since="garbage"), TYPE),
    "list_versions since=5": (lambda s: s.list_versions("k", since=5), TYPE),
    "list_versions since=naive": (lambda s: s.list_versions("k", since=NAIVE), VALUE),
    "list_versions until='garbage'": (lambda s: s.list_versions("k", until="garbage"), TYPE),
    "list_versions until=5": (lambda s: s.list_versions("k", until=5), TYPE),
    "list_versions until=naive": (lambda s: s.list_versions("k", until=NAIVE), VALUE),
    "read_version 1.9": (lambda s: s.read_version("k", 1.9), TYPE),
    "read_version 1.0": (lambda s: s.read_version("k", 1.0), TYPE),
    "read_version '1'": (lambda s: s.read_version("k", "1"), TYPE),
    "read_version True": (lambda s: s.read_version("k", True), TYPE),
    "read_version None": (lambda s: s.read_version("k", None), TYPE),
    "read_version 2**70": (lambda s: s.read_version("k", 2**70), ss.VersionNotFoundError),
    "restore 1.5": (lambda s: s.restore("k", 1.5), TYPE),
    "restore '1'": (lambda s: s.restore("k", "1"), TYPE),
    "restore True": (lambda s: s.restore("k", True), TYPE),
    "restore 2**70": (lambda s: s.restore("k", 2**70), ss.VersionNotFoundError),
    "peek max_age=nan": (lambda s: s.peek("k", max_age=NAN), VALUE),
    "peek max_age=inf": (lambda s: s.peek("k", max_age=INF), VALUE),
    "peek max_age=-1": (lambda s: s.peek("k", max_age=-1), VALUE),
    "peek max_age='1'": (lambda s: s.peek("k", max_age="1"), TYPE),
    "peek max_age=True": (lambda s: s.peek("k", max_age=True), TYPE),
}


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_bad_call_arguments(saved: ss.Store, case: str) -> None:
    call, error = BAD_CALLS[case]
    with pytest.raises(error) as info:
        call(saved)
    if error is not ss.VersionNotFoundError:
        assert_input_error(info.value, error)
    assert_unchanged(saved)


# -- Store calls: data that is not JSON ----------------------------------------------------

NOT_JSON_MESSAGE = r"nesting deeper than 255|cycle"
NOT_JSON: dict[str, Callable[[], Any]] = {
    "deep 300": lambda: {"coins": 1, "inventory": nested(300)},
    "deep 255 (one level too many)": lambda: {"coins": 1, "inventory": nested(MAX_DEPTH - 1)},
    "deep 5000": lambda: {"coins": 1, "inventory": nested(5000)},
    "cyclic": cyclic,
}


@pytest.mark.parametrize("case", list(NOT_JSON))
def test_update_with_data_that_is_not_json(saved: ss.Store, case: str) -> None:
    def mutate(data: Any) -> bool:
        data.clear()
        data.update(NOT_JSON[case]())
        return True

    with pytest.raises(ss.InvalidDataError, match=NOT_JSON_MESSAGE) as info:
        saved.update("k", mutate)
    assert not any(isinstance(e, RecursionError) for e in chain(info.value))
    assert_unchanged(saved)
    with pytest.raises(ss.InvalidDataError, match=NOT_JSON_MESSAGE):
        saved.update_immutable("k", lambda frozen: NOT_JSON[case]())
    assert_unchanged(saved)


@pytest.mark.parametrize("case", list(NOT_JSON))
def test_tx_with_data_that_is_not_json(saved: ss.Store, case: str) -> None:
    saved.load("other")

    def mutate(docs: dict[str, Any]) -> bool:
        docs["other"]["coins"] = 100
        docs["k"]["inventory"] = NOT_JSON[case]()
        return True

    with pytest.raises(ss.InvalidDataError, match=NOT_JSON_MESSAGE):
        saved.tx(["k", "other"], mutate)
    assert_unchanged(saved)
    assert saved.get("other") == {"coins": 0, "inventory": []}
    assert saved.list_versions("other") == []
    with pytest.raises(ss.InvalidDataError, match=NOT_JSON_MESSAGE):
        saved.tx_immutable(
            ["k", "other"], lambda docs: {"k": NOT_JSON[case](), "other": docs["other"]}
        )
    assert_unchanged(saved)


def test_data_at_the_depth_limit_is_stored(saved: ss.Store) -> None:
    deepest = {"coins": 1, "inventory": nested(MAX_DEPTH - 2)}  # leaf at level 255
    assert saved.update_immutable("k", lambda frozen: deepest)
    saved.save("k")
    assert saved.peek("k") == deepest
    assert saved.read_version("k", 3)[0] == deepest


@pytest.mark.parametrize("case", list(NOT_JSON))
def test_store_template_that_is_not_json(make_store: Callable[..., ss.Store], case: str) -> None:
    with pytest.raises(ss.InvalidDataError, match="template") as info:
        make_store(template=NOT_JSON[case]())
    assert not any(isinstance(e, RecursionError) for e in chain(info.value))


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"lock_timeout": NAN}, VALUE),
        ({"retry_timeout": INF}, VALUE),
        ({"view_cache_size": -1}, VALUE),
        ({"db_schema": "pg_catalog"}, VALUE),
        ({"db_schema": "information_schema"}, VALUE),
        ({"pool_size": 2.5}, TYPE),
        ({"lock_duration": True}, TYPE),
        ({"lock_refresh_interval": 10, "lock_duration": 10}, VALUE),
        ({"name": 5}, TYPE),
    ],
    ids=repr,
)
def test_bad_store_options_are_refused_before_any_io(
    options: dict[str, Any], error: type[Exception]
) -> None:
    started = time.monotonic()
    with pytest.raises(error) as info:
        ss.Store(**{"name": "x", "template": {}, "dsn": UNREACHABLE, **options})
    assert_input_error(info.value, error)
    assert time.monotonic() - started < 1.0  # no connection was even tried


def test_zero_cache_sizes_mean_no_cache(make_store: Callable[..., ss.Store]) -> None:
    writer = make_store(view_cache_size=0)
    reader = make_store(peek_cache_size=0, view_cache_size=0)
    writer.load("k")
    for coins in (1, 2):
        assert writer.update("k", lambda d, c=coins: d.__setitem__("coins", c) or True)
        assert writer.get("k")["coins"] == coins
        writer.save("k")
        assert reader.peek("k", max_age=60) == {"coins": coins, "inventory": []}  # not cached


# -- frozen data: depth and cycles, directly -------------------------------------------------


@pytest.mark.parametrize("levels", [MAX_DEPTH, 300, 999, 5000])
@pytest.mark.parametrize("walker", [freeze, ss.thaw, encode, encode_with_copy])
def test_too_deep_is_invalid_data(walker: Callable[[Any], Any], levels: int) -> None:
    with pytest.raises(ss.InvalidDataError, match="nesting deeper than 255"):
        walker(nested(levels))
    with pytest.raises(ss.InvalidDataError, match="nesting deeper than 255"):
        walker({"a": nested(levels, {"b": 1})})


def _self_list() -> Any:
    data: list[Any] = [1]
    data.append(data)
    return data


def _self_dict() -> Any:
    data: dict[str, Any] = {}
    data["me"] = data
    return data


def _through_tuple() -> Any:
    inner: list[Any] = []
    outer = (1, inner)
    inner.append(outer)
    return {"x": outer}


def _deep_cycle() -> Any:
    top: list[Any] = []
    bottom = nested(200, top)  # the cycle closes 201 levels down, within the depth limit
    top.append(bottom)
    return top


@pytest.mark.parametrize("make", [_self_list, _self_dict, _through_tuple, cyclic, _deep_cycle])
@pytest.mark.parametrize("walker", [freeze, ss.thaw, encode, encode_with_copy])
def test_cycles_are_invalid_data(walker: Callable[[Any], Any], make: Callable[[], Any]) -> None:
    with pytest.raises(ss.InvalidDataError, match="cycle"):
        walker(make())


def test_shared_subtrees_are_not_cycles() -> None:
    shared = {"n": [1, 2]}
    data = {"a": shared, "b": [shared, shared]}
    assert freeze(data) == data
    assert ss.thaw(data) == data
    assert encode(data) == b'{"a":{"n":[1,2]},"b":[{"n":[1,2]},{"n":[1,2]}]}'


@pytest.mark.parametrize("walker", [freeze, ss.thaw, encode])
def test_the_deepest_data_allowed(walker: Callable[[Any], Any]) -> None:
    data = nested(MAX_DEPTH - 1)  # 254 lists: the 0 is at level 255
    assert walker(data) is not None
    assert encode_with_copy(data)[1] == data


def test_freeze_json_of_foreign_deep_json() -> None:
    """Only another writer can store JSON this deep; reading it must still work."""
    raw = b"[" * 1000 + b"1" + b"]" * 1000
    frozen = freeze_json(decode(raw))
    for _ in range(1000):
        assert isinstance(frozen, ss.FrozenList)
        frozen = frozen[0]
    assert frozen == 1
    mixed = freeze_json(decode(b'{"a":' * 600 + b"[]" + b"}" * 600))
    assert isinstance(mixed, ss.FrozenDict)
    with pytest.raises(TypeError):
        mixed["a"]["a"]["x"] = 1
    with pytest.raises(ss.InvalidDataError, match="deeper than 255"):
        encode(mixed)  # and it cannot be written back as it is


def test_walkers_from_a_deep_call_stack() -> None:
    """One frame per level: data at the limit fits even when the caller is deep already."""
    data = nested(MAX_DEPTH - 1)
    raw = encode(data)
    results: list[Any] = []

    def descend(frames: int) -> None:
        if frames:
            descend(frames - 1)
            return
        results.append(freeze(data))
        results.append(ss.thaw(data))
        results.append(freeze_json(decode(raw)))

    descend(sys.getrecursionlimit() - 300 - len(_stack()))
    assert results == [data, data, data]


def _stack() -> list[Any]:
    import inspect

    return inspect.stack(0)


# -- DSNs ----------------------------------------------------------------------------------

OPTIONS = "options=-c%20statement_timeout%3D5000"


def with_options(dsn: str) -> str:
    return dsn + ("&" if "?" in dsn else "?") + OPTIONS


def test_dsn_options_reach_the_engine_and_the_control_connection(sessionstore_dsn: str) -> None:
    url = db.parse_dsn(with_options(sessionstore_dsn))
    assert url.query["options"] == "-c statement_timeout=5000"
    engine = db.create_engine(with_options(sessionstore_dsn), pool_size=1)
    try:
        with engine.connect() as conn:
            assert conn.execute(sa.text("SHOW statement_timeout")).scalar() == "5s"
    finally:
        engine.dispose()
    conninfo = db.libpq_conninfo(url)
    assert conninfo_to_dict(conninfo)["options"] == "-c statement_timeout=5000"
    with psycopg.connect(conninfo, autocommit=True) as conn:
        assert conn.execute("SHOW statement_timeout").fetchone() == ("5s",)


def test_store_with_dsn_options(make_store: Callable[..., ss.Store], sessionstore_dsn: str) -> None:
    store = make_store(dsn=with_options(sessionstore_dsn))  # waits for its control connection
    store.load("k")
    store.update("k", lambda d: d.__setitem__("coins", 7) or True)
    store.save("k")
    assert store.probe_lock_active("k")
    other = make_store(dsn=with_options(sessionstore_dsn), name=store.name)
    assert other.peek("k") == {"coins": 7, "inventory": []}
    store.unload("k")
    assert not other.probe_lock_active("k")


def test_store_with_a_sqlalchemy_url(
    make_store: Callable[..., ss.Store], sessionstore_dsn: str
) -> None:
    store = make_store(dsn=sa.make_url(with_options(sessionstore_dsn)))
    store.load("k")
    store.save("k")
    assert store.probe_lock_active("k")


@pytest.mark.parametrize(
    "password",
    ["p w", "it's", 'say "hi"', "back\\slash", "a+b", "100%", "@:/?#&=", "tab\there", "é"],
)
def test_libpq_conninfo_keeps_any_password(password: str) -> None:
    url = sa.URL.create("postgresql+psycopg", "u", password, "h", 5433, "db")
    for source in (url, db.parse_dsn(url.render_as_string(hide_password=False))):
        params = conninfo_to_dict(db.libpq_conninfo(source))
        assert params["password"] == password
        assert (params["user"], params["host"], params["port"], params["dbname"]) == (
            "u",
            "h",
            "5433",
            "db",
        )


def test_libpq_conninfo_of_sockets_and_several_hosts() -> None:
    socket = conninfo_to_dict(db.libpq_conninfo(db.parse_dsn("postgresql://u@/db?host=/tmp/a b")))
    assert socket["host"] == "/tmp/a b"
    hosts = conninfo_to_dict(
        db.libpq_conninfo(db.parse_dsn("postgresql://u@/db?host=h1:5432&host=h2:5433"))
    )
    assert (hosts["host"], hosts["port"]) == ("h1,h2", "5432,5433")


@pytest.mark.parametrize(
    "dsn",
    [
        "host=x password=s3cretpw' user",
        "host=x password=my s3cretpw user=u",
        "host=x password='s3cretpw user=u",
        "host=x password=s3cr'et s3cretpw user=u",
        "u:s3cretpw@host/db",
        "postgresql://u:s3cretpw@h:port/db",
        "mysql://u:s3cretpw@h/db",
    ],
)
def test_malformed_dsn_never_quotes_the_password(dsn: str) -> None:
    for attempt in (lambda: db.resolve_url(dsn), lambda: ss.Store("x", {}, dsn=dsn)):
        with pytest.raises(VALUE) as info:
            attempt()
        assert_input_error(info.value, VALUE)
        for error in chain(info.value):
            assert "s3cretpw" not in str(error)
            assert "s3cretpw" not in repr(error)


def test_unreachable_server_is_storage_unavailable_after_retry_timeout() -> None:
    started = time.monotonic()
    with pytest.raises(ss.StorageUnavailableError) as info:
        ss.Store("x", {}, dsn=UNREACHABLE, retry_timeout=0.5)
    elapsed = time.monotonic() - started
    assert 0.4 <= elapsed < 5.0
    assert "s3cretpw" not in str(info.value)
    assert "127.0.0.1" in str(info.value)
    assert info.value.__cause__ is not None  # the driver's error, chained


def test_ensure_schema_of_unreachable_server() -> None:
    engine = db.create_engine(UNREACHABLE, pool_size=1)
    try:
        started = time.monotonic()
        with pytest.raises(ss.StorageUnavailableError, match="ensure schema") as info:
            db.ensure_schema(engine, "sessionstore", retry=RetryPolicy(timeout=0.5))
        assert 0.4 <= time.monotonic() - started < 5.0
        assert "s3cretpw" not in str(info.value)
        assert isinstance(info.value.__cause__, sa_exc.OperationalError)
    finally:
        engine.dispose()


# -- which database errors are retried -------------------------------------------------------

SQLSTATES: list[tuple[type[psycopg.Error], bool]] = [
    (pe.QueryCanceled, False),  # 57014 statement_timeout: retrying costs the timeout again
    (pe.LockNotAvailable, False),  # 55P03 lock_timeout
    (pe.DiskFull, False),  # 53100
    (pe.OutOfMemory, False),  # 53200
    (pe.ProgramLimitExceeded, False),  # 54000
    (pe.StatementTooComplex, False),  # 54001
    (pe.TooManyColumns, False),  # 54011
    (pe.UndefinedTable, False),  # 42P01
    (pe.UniqueViolation, False),  # 23505
    (pe.DatabaseDropped, False),  # 57P04
    (pe.AdminShutdown, True),  # 57P01
    (pe.CrashShutdown, True),  # 57P02
    (pe.CannotConnectNow, True),  # 57P03
    (pe.IdleSessionTimeout, True),  # 57P05
    (pe.SerializationFailure, True),  # 40001
    (pe.DeadlockDetected, True),  # 40P01
    (pe.TooManyConnections, True),  # 53300
    (pe.ConnectionException, True),  # 08000
    (pe.ConnectionFailure, True),  # 08006
    (pe.SqlclientUnableToEstablishSqlconnection, True),  # 08001
]


@pytest.mark.parametrize(
    ("error", "transient"), SQLSTATES, ids=lambda v: str(getattr(v, "__name__", v))
)
def test_is_transient_by_sqlstate(error: type[psycopg.Error], transient: bool) -> None:
    exc = error("boom")
    assert exc.sqlstate is not None
    assert is_transient(exc) is transient
    wrapped = sa_exc.OperationalError("SELECT 1", {}, exc)
    assert is_transient(wrapped) is transient
    invalidated = sa_exc.OperationalError("SELECT 1", {}, exc, connection_invalidated=True)
    assert is_transient(invalidated) is True  # the connection is gone: a new one may work


@pytest.mark.parametrize(
    ("exc", "transient"),
    [
        (psycopg.OperationalError("connection failed: Connection refused"), True),
        (psycopg.InterfaceError("the connection is closed"), True),
        (pe.ConnectionTimeout("connection timeout expired"), True),
        (psycopg.ProgrammingError("the query has 1 placeholder but 2 parameters"), False),
        (psycopg.DataError("bad value"), False),
        (sa_exc.TimeoutError("QueuePool limit reached"), True),
        (sa_exc.DisconnectionError("gone"), True),
        (sa_exc.ArgumentError("bad"), False),
        (ValueError("not a database error"), False),
        (ss.LockLostError("lost"), False),
    ],
    ids=repr,
)
def test_is_transient_without_sqlstate(exc: BaseException, transient: bool) -> None:
    assert is_transient(exc) is transient


def _counting(exc: BaseException | None, calls: list[int]) -> Callable[[], str]:
    def operation() -> str:
        calls.append(1)
        if exc is not None:
            raise exc
        return "done"

    return operation


@pytest.mark.parametrize(
    "exc", [ValueError("mine"), ss.LockLostError("lost"), KeyError("k")], ids=repr
)
def test_with_retries_passes_other_errors_through(exc: BaseException) -> None:
    calls: list[int] = []
    with pytest.raises(type(exc)) as info:
        with_retries(RetryPolicy(timeout=5), "op", _counting(exc, calls))
    assert info.value is exc and calls == [1]


@pytest.mark.parametrize(
    "exc",
    [
        pe.QueryCanceled("canceling statement due to statement timeout"),
        sa_exc.ProgrammingError("SELECT x", {}, pe.UndefinedColumn("no column x")),
        sa_exc.ArgumentError("bad"),
        psycopg.ProgrammingError("client side"),
    ],
    ids=repr,
)
def test_with_retries_wraps_other_database_errors_at_once(exc: BaseException) -> None:
    calls: list[int] = []
    with pytest.raises(ss.StorageUnavailableError, match=r"^read thing: ") as info:
        with_retries(RetryPolicy(timeout=5), "read thing", _counting(exc, calls))
    assert info.value.__cause__ is exc and calls == [1]


def test_with_retries_retries_transient_errors() -> None:
    calls: list[int] = []
    flaky = [pe.AdminShutdown("terminating connection"), pe.SerializationFailure("retry")]

    def operation() -> str:
        calls.append(1)
        if flaky:
            raise flaky.pop(0)
        return "done"

    assert with_retries(RetryPolicy(timeout=5, initial_delay=0.001), "op", operation) == "done"
    assert len(calls) == 3
    calls.clear()
    started = time.monotonic()
    cause = pe.CannotConnectNow("the database system is starting up")
    with pytest.raises(ss.StorageUnavailableError, match="57P03") as info:
        with_retries(RetryPolicy(timeout=0.3), "op", _counting(cause, calls))
    assert 0.25 < time.monotonic() - started < 2 and len(calls) > 1
    assert info.value.__cause__ is cause


def test_with_retries_masks_secrets() -> None:
    cause = psycopg.OperationalError('password authentication failed: "hunter2"')
    with pytest.raises(ss.StorageUnavailableError) as info:
        with_retries(RetryPolicy(timeout=0), "op", _counting(cause, []), secrets=["hunter2"])
    assert "hunter2" not in str(info.value) and "***" in str(info.value)


def test_statement_timeout_is_not_retried(sessionstore_dsn: str) -> None:
    engine = db.create_engine(sessionstore_dsn, pool_size=1)
    calls: list[int] = []

    def slow() -> None:
        calls.append(1)
        with engine.connect() as conn:
            conn.execute(sa.text("SET statement_timeout = 50"))
            conn.execute(sa.text("SELECT pg_sleep(5)"))

    try:
        started = time.monotonic()
        with pytest.raises(ss.StorageUnavailableError, match="57014") as info:
            with_retries(RetryPolicy(timeout=10), "slow query", slow)
        assert time.monotonic() - started < 2.0 and calls == [1]
        assert "slow query" in str(info.value)
        assert "[SQL:" not in str(info.value)  # the driver's message, not SQLAlchemy's dump
        assert isinstance(info.value.__cause__, sa_exc.OperationalError)
        assert isinstance(info.value.__cause__.orig, pe.QueryCanceled)
    finally:
        engine.dispose()

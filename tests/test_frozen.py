"""Frozen (read-only) data, JSON validation of documents, and key validation."""

from __future__ import annotations

import copy
import dataclasses
import datetime
import decimal
import enum
import json
import pickle
import uuid
from collections.abc import Callable
from typing import Any

import orjson
import pytest

import sessionstore as ss
from sessionstore.frozen import LAZY_VIEW_THRESHOLD, encode, freeze_json

TEMPLATE = {"coins": 0, "inventory": []}
DOC = {
    "name": "ada",
    "coins": 3,
    "ratio": 0.5,
    "ok": True,
    "none": None,
    "tags": ["a", "b", {"deep": [1, 2, {"x": "y"}]}],
    "nested": {"inner": {"list": [1, [2, 3]], "n": 1}},
}


@pytest.fixture
def frozen(store: ss.Store) -> Any:
    """DOC as the store hands it out: loaded, updated, frozen."""
    store.load("k")
    store.update_immutable("k", lambda d: DOC)
    data = store.get("k")
    assert data == DOC
    return data


# -- frozen data -----------------------------------------------------------------------


DICT_MUTATORS: dict[str, Callable[[Any], Any]] = {
    "setitem": lambda d: d.__setitem__("coins", 1),
    "setitem new": lambda d: d.__setitem__("new", 1),
    "delitem": lambda d: d.__delitem__("coins"),
    "ior": lambda d: d.__ior__({"a": 1}),
    "clear": lambda d: d.clear(),
    "pop": lambda d: d.pop("coins"),
    "pop default": lambda d: d.pop("missing", None),
    "popitem": lambda d: d.popitem(),
    "setdefault": lambda d: d.setdefault("new", 1),
    "setdefault existing": lambda d: d.setdefault("coins", 1),
    "update": lambda d: d.update({"coins": 1}),
    "update kwargs": lambda d: d.update(coins=1),
    "update empty": lambda d: d.update(),
    "setattr": lambda d: setattr(d, "coins", 1),
}

LIST_MUTATORS: dict[str, Callable[[Any], Any]] = {
    "setitem": lambda seq: seq.__setitem__(0, "z"),
    "setitem slice": lambda seq: seq.__setitem__(slice(0, 1), ["z"]),
    "delitem": lambda seq: seq.__delitem__(0),
    "delitem slice": lambda seq: seq.__delitem__(slice(0, 2)),
    "iadd": lambda seq: seq.__iadd__(["z"]),
    "imul": lambda seq: seq.__imul__(2),
    "append": lambda seq: seq.append("z"),
    "clear": lambda seq: seq.clear(),
    "extend": lambda seq: seq.extend(["z"]),
    "insert": lambda seq: seq.insert(0, "z"),
    "pop": lambda seq: seq.pop(),
    "pop index": lambda seq: seq.pop(0),
    "remove": lambda seq: seq.remove("a"),
    "reverse": lambda seq: seq.reverse(),
    "sort": lambda seq: seq.sort(),
    "setattr": lambda seq: setattr(seq, "x", 1),
}


@pytest.mark.parametrize("name", sorted(DICT_MUTATORS))
def test_every_dict_mutator_raises(frozen: Any, store: ss.Store, name: str) -> None:
    assert isinstance(frozen, dict)
    for target in (frozen, frozen["nested"], frozen["nested"]["inner"], frozen["tags"][2]):
        with pytest.raises((TypeError, AttributeError)) as info:
            DICT_MUTATORS[name](target)
        if name != "setattr":
            assert info.type is TypeError
    assert frozen == DOC
    assert store.get("k") == DOC


@pytest.mark.parametrize("name", sorted(LIST_MUTATORS))
def test_every_list_mutator_raises(frozen: Any, store: ss.Store, name: str) -> None:
    targets = [
        frozen["tags"],
        frozen["nested"]["inner"]["list"],
        frozen["nested"]["inner"]["list"][1],
    ]
    for target in targets:
        assert isinstance(target, list)
        with pytest.raises((TypeError, AttributeError)) as info:
            LIST_MUTATORS[name](target)
        if name != "setattr":
            assert info.type is TypeError
    assert frozen == DOC
    assert store.get("k") == DOC


def test_augmented_assignment_on_nested_values_raises(frozen: Any) -> None:
    tags = frozen["tags"]
    with pytest.raises(TypeError):
        tags += ["z"]
    inner = frozen["nested"]
    with pytest.raises(TypeError):
        inner |= {"z": 1}
    assert frozen == DOC


def test_frozen_types(frozen: Any) -> None:
    assert isinstance(frozen, ss.FrozenDict)
    assert isinstance(frozen["tags"], ss.FrozenList)
    assert isinstance(frozen["tags"][2], ss.FrozenDict)
    assert isinstance(frozen["nested"]["inner"]["list"][1], ss.FrozenList)


def test_frozen_compares_equal_to_plain_data(frozen: Any) -> None:
    assert frozen == DOC
    assert DOC == frozen  # noqa: SIM300 - the plain side first, on purpose
    assert frozen["tags"] == ["a", "b", {"deep": [1, 2, {"x": "y"}]}]
    assert ["a", "b", {"deep": [1, 2, {"x": "y"}]}] == frozen["tags"]  # noqa: SIM300
    assert frozen != {**DOC, "coins": 4}
    assert frozen["tags"][:2] == ["a", "b"]
    assert list(frozen) == list(DOC)
    assert dict(frozen) == DOC
    assert len(frozen) == len(DOC)
    assert "coins" in frozen
    assert frozen.get("missing", 7) == 7
    assert {**frozen, "coins": 9}["coins"] == 9


def test_frozen_serialises_like_plain_data(frozen: Any) -> None:
    assert json.dumps(frozen, sort_keys=True) == json.dumps(DOC, sort_keys=True)
    assert json.loads(json.dumps(frozen)) == DOC
    assert orjson.dumps(frozen, option=orjson.OPT_SORT_KEYS) == orjson.dumps(
        DOC, option=orjson.OPT_SORT_KEYS
    )
    assert orjson.loads(orjson.dumps(frozen)) == DOC


def test_frozen_pickles(frozen: Any) -> None:
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        restored = pickle.loads(pickle.dumps(frozen, protocol=protocol))
        assert restored == DOC
        assert isinstance(restored, ss.FrozenDict)
        with pytest.raises(TypeError):
            restored["tags"].append("z")
        with pytest.raises(TypeError):
            restored["coins"] = 1
        assert restored == DOC


def test_frozen_copies(frozen: Any) -> None:
    for copied in (copy.copy(frozen), copy.deepcopy(frozen)):
        assert copied == DOC
        with pytest.raises(TypeError):
            copied["coins"] = 1
        with pytest.raises(TypeError):
            copied["tags"].append("z")
    assert copy.deepcopy({"wrapped": frozen}) == {"wrapped": DOC}


# Views are lazy (docs/large-documents.md): a child container is frozen when
# it is first read. Each way of reaching a child, tried on a view where no
# child was read yet, must hand out a frozen one: never the parser's plain
# container, whose change would change the document behind the store's back.
CHILD_ROUTES: dict[str, Callable[[Any], Any]] = {
    "getitem": lambda d: d["nested"],
    "get": lambda d: d.get("nested"),
    "values": lambda d: next(v for v in d.values() if isinstance(v, dict)),
    "items": lambda d: dict(d.items())["nested"],
    "dict()": lambda d: dict(d)["nested"],
    "splat": lambda d: {**d}["nested"],
    "or": lambda d: (d | {})["nested"],
    "ror": lambda d: ({} | d)["nested"],
    "copy": lambda d: d.copy()["nested"],
    "kwargs": lambda d: (lambda **kw: kw)(**d)["nested"],
    "list index": lambda d: d["tags"][2],
    "list negative index": lambda d: d["tags"][-1],
    "list slice": lambda d: d["tags"][1:][1],
    "list iter": lambda d: list(d["tags"])[2],
    "list for": lambda d: next(x for x in d["tags"] if isinstance(x, dict)),
    "list reversed": lambda d: next(reversed(d["tags"])),
    "list copy": lambda d: d["tags"].copy()[2],
    "list add": lambda d: (d["tags"] + [])[2],
    "list add views": lambda d: ([1] + d["tags"] + d["tags"])[6],
    "list radd": lambda d: ([] + d["tags"])[2],
    "list mul": lambda d: (d["tags"] * 2)[5],
    "list rmul": lambda d: (2 * d["tags"])[5],
    "tuple()": lambda d: tuple(d["tags"])[2],
    "unpack": lambda d: (lambda a, b, c: c)(*d["tags"]),
    "sorted keys": lambda d: [d[k] for k in sorted(d)][2],
}


@pytest.mark.parametrize("route", CHILD_ROUTES.values(), ids=list(CHILD_ROUTES))
def test_every_route_to_a_child_gives_a_frozen_one(route: Any) -> None:
    view = freeze_json(orjson.loads(orjson.dumps(DOC)))  # lazy: no child read yet
    child = route(view)
    assert isinstance(child, (ss.FrozenDict, ss.FrozenList)), type(child)
    with pytest.raises(TypeError):
        child.clear()
    assert view == DOC


def test_adding_views_and_extending_a_list_by_one() -> None:
    view = freeze_json(orjson.loads(orjson.dumps({"a": [{"x": 1}], "b": [{"y": 2}]})))
    both = view["a"] + view["b"]
    assert [type(item) for item in both] == [ss.FrozenDict, ss.FrozenDict]
    plain: list[Any] = [0]
    alias = plain
    plain += view["b"]  # extends in place, as for any list
    assert plain is alias and plain == [0, {"y": 2}]
    assert type(plain[1]) is ss.FrozenDict


def test_small_documents_are_frozen_whole_large_ones_lazily(store: ss.Store) -> None:
    """C code that reads a dict's storage (pydantic-core, msgspec) sees frozen
    containers in a small document; a large one's view freezes as it is read
    (docs/large-documents.md)."""
    store.load("small")
    store.update_immutable("small", lambda d: DOC)
    small = store.get("small")
    assert type(dict.__getitem__(small, "nested")) is ss.FrozenDict
    big = {**DOC, "pad": ["x" * 100] * (LAZY_VIEW_THRESHOLD // 100)}
    store.load("big")
    store.update_immutable("big", lambda d: big)
    view = store.get("big")
    assert type(dict.__getitem__(view, "nested")) is dict, "not read yet"
    assert type(view["nested"]) is ss.FrozenDict
    assert type(dict.__getitem__(view, "nested")) is ss.FrozenDict, "frozen once read"
    assert view == big


def test_views_are_read_in_place_and_then_shared() -> None:
    view = freeze_json(orjson.loads(orjson.dumps(DOC)))
    assert view["nested"] is view["nested"], "a child is frozen once, then shared"
    assert view["tags"][2] is view["tags"][2]
    assert view == DOC
    assert hash(view) == hash(ss.freeze(DOC))


def test_encoding_a_view_reads_no_child() -> None:
    """orjson serialises the parser's own children: a large view stays unfrozen."""
    view = freeze_json(orjson.loads(orjson.dumps(DOC)))
    assert orjson.loads(encode(view)) == DOC
    assert ss.thaw(view) == DOC
    assert type(dict.__getitem__(view, "nested")) is dict, "thaw and encode read raw storage"


def test_thaw_gives_a_deep_mutable_copy(frozen: Any) -> None:
    thawed = ss.thaw(frozen)
    assert thawed == DOC
    assert type(thawed) is dict
    assert type(thawed["tags"]) is list
    assert type(thawed["tags"][2]) is dict
    assert type(thawed["nested"]["inner"]["list"][1]) is list
    thawed["coins"] = 100
    thawed["tags"].append("z")
    thawed["tags"][2]["deep"].append(3)
    thawed["nested"]["inner"]["list"][1].append(4)
    assert frozen == DOC, "changing the thawed copy must not touch the frozen data"


def test_thaw_of_plain_data_is_a_copy() -> None:
    plain = {"a": [1, {"b": 2}]}
    thawed = ss.thaw(plain)
    thawed["a"][1]["b"] = 3
    assert plain == {"a": [1, {"b": 2}]}


def test_freeze_helper() -> None:
    data = {"a": [1, {"b": 2}]}
    frozen = ss.freeze(data)
    assert frozen == data
    assert isinstance(frozen, ss.FrozenDict)
    with pytest.raises(TypeError):
        frozen["a"].append(3)
    data["a"].append(3)
    assert frozen == {"a": [1, {"b": 2}]}, "freeze must copy, not wrap"


def test_update_immutable_result_is_frozen_and_detached(store: ss.Store) -> None:
    store.load("k")
    new = {"coins": 1, "inventory": ["a"]}
    store.update_immutable("k", lambda d: new)
    new["inventory"].append("smuggled")
    new["coins"] = 50
    assert store.get("k") == {"coins": 1, "inventory": ["a"]}
    with pytest.raises(TypeError):
        store.get("k")["inventory"].append("b")


# -- JSON validation -------------------------------------------------------------------


class Color(enum.Enum):
    RED = "red"


class Level(enum.IntEnum):
    ONE = 1


class Mood(str, enum.Enum):
    HAPPY = "happy"


@dataclasses.dataclass
class Point:
    x: int


class Plain:
    pass


BAD_VALUES: dict[str, Any] = {
    "nan": float("nan"),
    "inf": float("inf"),
    "-inf": float("-inf"),
    "set": {1, 2},
    "frozenset": frozenset({"a"}),
    "bytes": b"abc",
    "bytearray": bytearray(b"abc"),
    "object": object(),
    "plain instance": Plain(),
    "dataclass": Point(1),
    "uuid": uuid.UUID(int=1),
    "enum": Color.RED,
    "datetime": datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc),
    "date": datetime.date(2024, 1, 1),
    "time": datetime.time(12, 0),
    "decimal": decimal.Decimal("1.5"),
    "complex": 1j,
    "int 2**64": 2**64,
    "int -(2**63)-1": -(2**63) - 1,
    "int 2**100": 2**100,
    "function": len,
}

BAD_DOCS: dict[str, list[Any]] = {
    **{
        f"value {name}": [
            {"coins": 0, "inventory": [], "bad": value},
            {"coins": 0, "inventory": [{"deep": [value]}]},
        ]
        for name, value in BAD_VALUES.items()
    },
    **{
        f"key {name}": [
            {"coins": 0, "inventory": [], key: "x"},
            {"coins": 0, "inventory": [{"deep": {key: "x"}}]},
        ]
        for name, key in {
            "int": 1,
            "tuple": (1, 2),
            "none": None,
            "bool": True,
            "float": 1.5,
            "bytes": b"k",
        }.items()
    },
}


def test_int_and_str_enums_are_stored_as_their_plain_values(store: ss.Store) -> None:
    """IntEnum / str-mixin enums *are* ints and strs (as for json.dumps); they come back plain."""
    assert ss.freeze({"a": [Level.ONE, Mood.HAPPY]}) == {"a": [1, "happy"]}
    store.load("k")
    assert store.update("k", lambda d: d.update(level=Level.ONE, mood=Mood.HAPPY) or True)
    assert store.get("k")["level"] == 1 and type(store.get("k")["level"]) is int
    assert type(store.get("k")["mood"]) is str
    store.save("k")
    assert store.peek("k")["mood"] == "happy"


@pytest.mark.parametrize("name", sorted(BAD_VALUES))
def test_freeze_rejects_non_json(name: str) -> None:
    with pytest.raises(ss.InvalidDataError):
        ss.freeze({"a": [BAD_VALUES[name]]})


@pytest.mark.parametrize("name", sorted(BAD_DOCS))
def test_update_rejects_non_json_and_changes_nothing(store: ss.Store, name: str) -> None:
    store.load("k")
    store.update("k", lambda d: d.update(coins=1) or True)
    store.save("k")
    versions = len(store.list_versions("k"))
    for bad in BAD_DOCS[name]:

        def mutate(data: Any, bad: Any = bad) -> bool:
            data.clear()
            data.update(copy.copy(bad))
            return True

        with pytest.raises(ss.InvalidDataError):
            store.update("k", mutate)
        with pytest.raises(ss.InvalidDataError):
            store.update_immutable("k", lambda d, bad=bad: bad)
        with pytest.raises(ss.InvalidDataError):
            store.tx(["k"], lambda m, mutate=mutate: mutate(m["k"]))
        with pytest.raises(ss.InvalidDataError):
            store.tx_immutable(["k"], lambda m, bad=bad: {"k": bad})
    assert store.get("k") == {"coins": 1, "inventory": []}
    assert store.is_saved("k") is True
    store.save("k")
    assert len(store.list_versions("k")) == versions
    assert store.peek("k") == {"coins": 1, "inventory": []}
    # The next transform sees clean data.
    seen: list[Any] = []
    store.update("k", lambda d: seen.append(ss.thaw(d)) or False)
    assert seen == [{"coins": 1, "inventory": []}]


@pytest.mark.parametrize(
    "value",
    [2**63 - 1, -(2**63), 0, -1, 1.5, -0.0, 1e308, "", "ünïcødé \u2603", True, False, None],
)
def test_json_values_are_accepted_and_round_trip(
    make_store: Callable[..., ss.Store], value: Any
) -> None:
    store = make_store()
    store.load("k")
    assert store.update("k", lambda d: d.update(v=value, nested=[{"v": value}]) or True) is True
    store.unload("k")
    reader = make_store()
    stored = reader.peek("k")
    assert stored["v"] == value
    assert type(stored["v"]) is type(value)
    assert stored["nested"] == [{"v": value}]


def test_non_dict_documents_are_json_too(make_store: Callable[..., ss.Store]) -> None:
    store = make_store(template=[1, 2])
    store.load("k")
    assert store.get("k") == [1, 2]
    assert isinstance(store.get("k"), ss.FrozenList)
    store.update_immutable("k", lambda d: "just a string")
    store.save("k")
    assert store.peek("k") == "just a string"


def test_invalid_template_is_rejected(make_store: Callable[..., ss.Store]) -> None:
    with pytest.raises(ss.InvalidDataError):
        make_store({"coins": float("nan")})
    with pytest.raises(ss.InvalidDataError):
        make_store({1: "x"})


def test_invalid_import_fails_the_load_and_releases(make_store: Callable[..., ss.Store]) -> None:
    store = make_store(import_legacy_data=lambda key: {"when": datetime.date(2020, 1, 1)})
    with pytest.raises(ss.InvalidDataError):
        store.load("k")
    assert store.probe_lock_active("k") is False


def test_document_larger_than_max_document_size_is_invalid(
    make_store: Callable[..., ss.Store],
) -> None:
    store = make_store(max_document_size=200)
    store.load("k")
    with pytest.raises(ss.InvalidDataError):
        store.update("k", lambda d: d.update(blob="x" * 500) or True)
    assert store.get("k") == TEMPLATE
    assert store.is_saved("k") is True
    assert store.update("k", lambda d: d.update(blob="x" * 50) or True) is True


@pytest.mark.parametrize("error", [ss.InvalidDataError, ss.InvalidKeyError])
def test_input_errors_are_value_and_type_errors(error: type[Exception]) -> None:
    assert issubclass(error, ss.SessionStoreError)
    assert issubclass(error, ValueError)
    assert issubclass(error, TypeError)


def test_invalid_data_error_is_catchable_as_value_error(store: ss.Store) -> None:
    store.load("k")
    with pytest.raises(ValueError):
        store.update("k", lambda d: d.update(x=float("nan")) or True)
    with pytest.raises(TypeError):
        store.update("k", lambda d: d.update(x={1, 2}) or True)


# -- keys ------------------------------------------------------------------------------


EURO = "\u20ac"  # 3 bytes of UTF-8
KEY_511 = EURO * 170 + "a"
KEY_512 = EURO * 170 + "ab"
KEY_513 = EURO * 171

BAD_KEYS: dict[str, Any] = {
    "int": 1,
    "none": None,
    "bytes": b"k",
    "tuple": ("k",),
    "empty": "",
    "nul": "a\x00b",
    "only nul": "\x00",
    "513 bytes multibyte": KEY_513,
    "513 bytes ascii": "a" * 513,
    "lone surrogate": "a\ud800",
}

KEY_CALLS: dict[str, Callable[[ss.Store, Any], Any]] = {
    "load": lambda s, k: s.load(k),
    "get": lambda s, k: s.get(k),
    "update": lambda s, k: s.update(k, lambda d: True),
    "update_immutable": lambda s, k: s.update_immutable(k, lambda d: False),
    "save": lambda s, k: s.save(k),
    "unload": lambda s, k: s.unload(k),
    "is_saved": lambda s, k: s.is_saved(k),
    "peek": lambda s, k: s.peek(k),
    "probe_lock_active": lambda s, k: s.probe_lock_active(k),
    "list_versions": lambda s, k: s.list_versions(k),
    "read_version": lambda s, k: s.read_version(k, 1),
    "erase": lambda s, k: s.erase(k),
    "tx": lambda s, k: s.tx([k], lambda m: True),
    "tx_immutable": lambda s, k: s.tx_immutable([k], lambda m: False),
}


def test_key_byte_lengths() -> None:
    assert len(KEY_511.encode()) == 511
    assert len(KEY_512.encode()) == 512
    assert len(KEY_513.encode()) == 513
    assert len(KEY_513) < 512, "the limit is in bytes, not characters"


@pytest.mark.parametrize("key", sorted(BAD_KEYS))
def test_bad_keys_raise_invalid_key_error(store: ss.Store, key: str) -> None:
    store.load("k")
    for call in sorted(KEY_CALLS):
        with pytest.raises(ss.InvalidKeyError):
            KEY_CALLS[call](store, BAD_KEYS[key])
            pytest.fail(f"{call}({BAD_KEYS[key]!r}) did not raise")
    assert store.get("k") == TEMPLATE


@pytest.mark.parametrize("key", [KEY_511, KEY_512, "a" * 512, "x", "ключ/with spaces:and.dots"])
def test_valid_keys_work_end_to_end(make_store: Callable[..., ss.Store], key: str) -> None:
    store = make_store()
    store.load(key)
    store.update(key, lambda d: d.update(coins=5) or True)
    store.save(key)
    assert store.probe_lock_active(key) is True
    store.unload(key)
    reader = make_store()
    assert reader.peek(key) == {"coins": 5, "inventory": []}
    assert [v.version for v in reader.list_versions(key)] == [1]
    assert reader.read_version(key, 1)[0] == {"coins": 5, "inventory": []}
    reader.erase(key)
    assert reader.peek(key) is None


def test_session_context_rejects_bad_key(store: ss.Store) -> None:
    with pytest.raises(ss.InvalidKeyError), store.session(KEY_513):
        pass
    with pytest.raises(ss.InvalidKeyError, match="NUL"):
        store.load("a\x00")

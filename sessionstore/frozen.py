"""Read-only JSON data, and the checks that make data JSON.

Owns what a document may contain (docs/api.md, "Data and keys": dict with str keys, list,
str, 64-bit int, finite float, bool, None) and its frozen form.
:func:`freeze` validates and freezes in one walk; :func:`thaw` gives back
plain, mutable containers; :func:`encode`/:func:`decode` are the one JSON
codec of the package (orjson). Keys are validated here too.

Frozen containers subclass ``dict`` and ``list``: they compare equal to plain
ones and serialise like them (``json``, ``orjson``), but every mutating
method raises ``TypeError``.

Data nested deeper than :data:`MAX_DEPTH` levels, or that contains itself,
raises :class:`InvalidDataError` from every entry point here, never a
``RecursionError``: the walkers count their depth and keep the ids of the
containers on their current path (and use one stack frame per level, so a
document at the limit fits comfortably within Python's recursion limit).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, ItemsView, Iterator, Mapping, ValuesView
from typing import Any, NoReturn, SupportsIndex

import orjson

from .errors import CorruptDataError, InvalidDataError, InvalidKeyError

__all__ = [
    "JSON",
    "MAX_DEPTH",
    "MAX_KEY_BYTES",
    "FrozenDict",
    "FrozenList",
    "check_key",
    "decode",
    "encode",
    "encode_parsed",
    "encode_with_copy",
    "freeze",
    "freeze_json",
    "frozen_view",
    "thaw",
]

JSON = Any
"""A JSON value: dict, list, str, int, float, bool or None."""

MAX_KEY_BYTES = 512
MAX_DEPTH = 255
"""Deepest nesting of a document, in levels: the top value is at level 1, the
items of a container at level n are at level n + 1, and nothing may be at
level 256. So containers nest at most 254 deep (a 255th, even empty, opens
level 256): exactly what orjson, the package's codec, can serialise."""
_CONTAINER_DEPTH = MAX_DEPTH - 1
_INT_MIN = -(2**63)
_INT_MAX = 2**64 - 1  # orjson's range: signed and unsigned 64-bit


def _read_only(self: object, *args: object, **kwargs: object) -> NoReturn:
    raise TypeError(f"{type(self).__name__} is read-only: change data inside update()")


# The frozen containers are lazy: built over data fresh from the parser, they
# keep its plain children and replace each by its frozen view the first time
# it is read (a shallow copy of that one container, written back into the
# parent's own storage, so a path is frozen once and then shared). Reading a
# document therefore costs what the parse costs plus the containers read,
# not a walk of the whole tree. The plain children never escape: every
# method that hands out a child is overridden below, and ``__iter__`` is
# overridden (to itself) so that CPython's dict merge (``dict(d)``, ``{**d}``,
# ``d | x``) takes its slow path through ``keys()`` and ``__getitem__``. The
# storage is only ever read raw by this module (encode, thaw, freeze).
_dict_get = dict.__getitem__
_dict_set = dict.__setitem__
_list_get = list.__getitem__
_list_set = list.__setitem__
_dict_items = dict.items
_list_iter = list.__iter__


class FrozenDict(dict[str, Any]):
    """A read-only ``dict``; ``thaw()`` or ``dict(...)`` gives a mutable copy."""

    # _settled: present once every child is frozen (see _settle_dict).
    __slots__ = ("_settled",)
    _settled: bool

    __setitem__ = _read_only
    __delitem__ = _read_only
    __ior__ = _read_only
    clear = _read_only
    pop = _read_only
    popitem = _read_only
    setdefault = _read_only
    update = _read_only

    def __getitem__(self, name: str) -> Any:
        item = _dict_get(self, name)
        view = freeze_json(item)
        if view is not item:
            _dict_set(self, name, view)
        return view

    def get(self, name: str, default: Any = None) -> Any:
        return self[name] if dict.__contains__(self, name) else default

    def __iter__(self) -> Iterator[str]:
        return dict.__iter__(self)

    def values(self) -> ValuesView[Any]:  # type: ignore[override]
        return dict.values(_settle_dict(self))

    def items(self) -> ItemsView[str, Any]:  # type: ignore[override]
        return dict.items(_settle_dict(self))

    def copy(self) -> dict[str, Any]:
        """A plain, shallow copy (its containers are frozen)."""
        return dict(_dict_items(_settle_dict(self)))

    def __or__(self, other: Any) -> dict[str, Any]:  # type: ignore[override]
        return dict.__or__(_settle_dict(self), other)

    def __ror__(self, other: Any) -> dict[str, Any]:  # type: ignore[override]
        return dict.__ror__(_settle_dict(self), other)

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(frozenset(self.items()))

    def __copy__(self) -> FrozenDict:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> FrozenDict:
        return self

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[Any, ...]]:
        return (_make_frozen_dict, (dict(_dict_items(_settle_dict(self))),))

    def __repr__(self) -> str:
        return f"FrozenDict({dict.__repr__(_settle_dict(self))})"


class FrozenList(list[Any]):
    """A read-only ``list``; ``thaw()`` or ``list(...)`` gives a mutable copy."""

    __slots__ = ("_settled",)
    _settled: bool

    __setitem__ = _read_only
    __delitem__ = _read_only
    __iadd__ = _read_only
    __imul__ = _read_only
    append = _read_only
    clear = _read_only
    extend = _read_only
    insert = _read_only
    pop = _read_only
    remove = _read_only
    reverse = _read_only
    sort = _read_only

    def __getitem__(self, index: Any) -> Any:
        if type(index) is not int:
            if type(index) is slice:
                return [self[position] for position in range(len(self))[index]]
            index = operator.index(index)  # once: the read and the write-back agree
        item = _list_get(self, index)
        view = freeze_json(item)
        if view is not item:
            _list_set(self, index, view)
        return view

    def __iter__(self) -> Iterator[Any]:
        return _list_iter(_settle_list(self))

    def __reversed__(self) -> Iterator[Any]:
        return list.__reversed__(_settle_list(self))

    def copy(self) -> list[Any]:
        """A plain, shallow copy (its containers are frozen)."""
        return list(_list_iter(_settle_list(self)))

    def __add__(self, other: Any) -> list[Any]:
        if type(other) is FrozenList:
            _settle_list(other)  # list.__add__ copies its storage too
        return list.__add__(_settle_list(self), other)

    def __radd__(self, other: Any) -> Any:
        # Settle, then let Python go on as without this method: ``plain +
        # view`` concatenates and ``plain += view`` extends ``plain`` in
        # place, both from the now frozen storage.
        _settle_list(self)
        return NotImplemented

    def __mul__(self, count: SupportsIndex) -> list[Any]:
        return list.__mul__(_settle_list(self), count)

    __rmul__ = __mul__

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(tuple(self))

    def __copy__(self) -> FrozenList:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> FrozenList:
        return self

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[Any, ...]]:
        return (FrozenList, (list(_list_iter(_settle_list(self))),))

    def __repr__(self) -> str:
        return f"FrozenList({list.__repr__(_settle_list(self))})"


def _settle_dict(frozen: FrozenDict) -> FrozenDict:
    """Freeze the children of ``frozen`` still plain (one level) before handing them out.

    Once done, ``frozen`` is marked (its children never turn plain again), so
    iterating a settled container costs one attribute read, not a walk.
    """
    if not hasattr(frozen, "_settled"):
        for name, item in _dict_items(frozen):
            view = freeze_json(item)
            if view is not item:
                _dict_set(frozen, name, view)
        frozen._settled = True
    return frozen


def _settle_list(frozen: FrozenList) -> FrozenList:
    """:func:`_settle_dict` for a list."""
    if not hasattr(frozen, "_settled"):
        for index, item in enumerate(_list_iter(frozen)):
            view = freeze_json(item)
            if view is not item:
                _list_set(frozen, index, view)
        frozen._settled = True
    return frozen


def _make_frozen_dict(items: Mapping[str, Any]) -> FrozenDict:
    return FrozenDict(items)


def _bad(path: str, why: str) -> NoReturn:
    if len(path) > 120:  # 254 levels of "[0]" say nothing the head and tail do not
        path = f"{path[:60]}...{path[-40:]}"
    raise InvalidDataError(f"data at {path or '$'} is not JSON: {why}")


_TOO_DEEP = f"nesting deeper than {MAX_DEPTH} levels"
_CYCLE = "cycle: a container that contains itself"


def freeze(value: Any, path: str = "") -> Any:
    """Check that ``value`` is JSON and return it deeply frozen.

    Already-frozen subtrees are checked and shared, not copied twice. Raises
    :class:`InvalidDataError` naming the path of the first offending value
    (nesting deeper than :data:`MAX_DEPTH` and cycles included).
    """
    return _freeze(value, path, 1, set())


def _freeze(value: Any, path: str, depth: int, active: set[int]) -> Any:
    """:func:`freeze` of ``value`` at level ``depth``; ``active``: ids of the containers above."""
    kind = type(value)
    if kind is str or kind is bool or value is None:
        return value
    if kind is int:
        if _INT_MIN <= value <= _INT_MAX:
            return value
        _bad(path, f"integer {value} does not fit in 64 bits")
    # An IntEnum or str-mixin enum is an int or a str (as json.dumps has it):
    # stored, and given back, as the plain value.
    if isinstance(value, int) and not isinstance(value, bool):
        return _freeze(int(value), path, depth, active)
    if isinstance(value, str):
        return str.__str__(value)
    if kind is float:
        if math.isfinite(value):
            return value
        _bad(path, f"float {value} is not finite")
    is_dict = kind is dict or kind is FrozenDict
    if not (is_dict or kind is list or kind is FrozenList or kind is tuple):
        _bad(path, f"{kind.__name__} is not a JSON type")
    if depth > _CONTAINER_DEPTH:
        _bad(path, _TOO_DEEP)
    ident = id(value)
    if ident in active:
        _bad(path, _CYCLE)
    active.add(ident)
    # Loops rather than comprehensions: on 3.10 and 3.11 a comprehension is
    # one more stack frame per level.
    if is_dict:
        items = {}
        for name, item in _dict_items(value):  # raw: a FrozenDict's children as stored
            if type(name) is not str:
                _bad(path, f"dict key {name!r} is {type(name).__name__}, not str")
            items[name] = _freeze(item, f"{path}.{name}", depth + 1, active)
        frozen: Any = FrozenDict(items)
    else:
        elements = []
        for index, item in enumerate(_list_iter(value) if kind is not tuple else value):
            elements.append(_freeze(item, f"{path}[{index}]", depth + 1, active))
        frozen = FrozenList(elements)
    active.discard(ident)
    return frozen


LAZY_VIEW_THRESHOLD = 64 * 1024
"""JSON bytes above which a document's frozen view is lazy (docs/large-documents.md).

Smaller documents are frozen whole when their view is built (about 2.5x
the parse: 18 us for 2 KB): every container is frozen, also for C code
that reads a dict's or list's storage directly (pydantic-core, msgspec).
Larger ones are frozen as they are read, so that a first read costs about
the parse."""


def frozen_view(
    raw: bytes | bytearray | memoryview, context: str | Callable[[], str] = "document"
) -> Any:
    """The frozen data of a document's JSON bytes: whole, or lazy above :data:`LAZY_VIEW_THRESHOLD`.

    Bytes that do not parse raise :class:`CorruptDataError` (see :func:`decode`).
    """
    value = decode(raw, context)
    return freeze_json(value) if len(raw) > LAZY_VIEW_THRESHOLD else _freeze_whole(value)


def freeze_json(value: Any) -> Any:
    """The lazy frozen view of data known to be JSON (fresh from :func:`decode`): no checks.

    O(size of the top container): the view freezes nested containers as
    they are read (see :class:`FrozenDict`), and takes ownership of
    ``value``, which nobody else may hold. Any depth: nothing recurses.
    """
    kind = type(value)
    if kind is dict:
        return FrozenDict(value)
    if kind is list:
        return FrozenList(value)
    return value


def _freeze_whole(value: Any) -> Any:
    """Every container of ``value`` (known JSON, owned) frozen now; any depth."""
    kind = type(value)
    try:
        if kind is dict:
            return _freeze_dict(value)
        if kind is list:
            return _freeze_list(value)
    except RecursionError:  # deeper than the stack (JSON another writer stored)
        return _freeze_deep(value)
    return value


def _freeze_deep(value: Any) -> Any:
    """:func:`_freeze_whole` without recursion: each view, then its children, from a stack."""
    root = freeze_json(value)
    pending = [root]
    while pending:
        frozen = pending.pop()
        children = _settle_dict(frozen).values() if type(frozen) is FrozenDict else frozen
        pending.extend(child for child in children if type(child) in _VIEWS)
    return root


_VIEWS = (FrozenDict, FrozenList)


# The two walkers test each child's type inline instead of recursing into
# every scalar: a call per container, not per value. A dict is copied whole
# in C and only its container values are replaced (through dict's own
# __setitem__, as FrozenDict refuses); a list is rebuilt by a comprehension.
def _freeze_dict(value: dict[str, Any]) -> FrozenDict:
    out = FrozenDict(value)
    for name, item in value.items():
        kind = type(item)
        if kind is dict:
            _dict_set(out, name, _freeze_dict(item))
        elif kind is list:
            _dict_set(out, name, _freeze_list(item))
    return out


def _freeze_list(value: list[Any]) -> FrozenList:
    return FrozenList(
        [
            _freeze_dict(item)
            if type(item) is dict
            else _freeze_list(item)
            if type(item) is list
            else item
            for item in value
        ]
    )


_CONTAINERS = frozenset({dict, FrozenDict, list, FrozenList, tuple})


def thaw(value: Any) -> Any:
    """Return a deep, plain, mutable copy of JSON data (frozen or not).

    Values that are not containers are returned as they are (unchecked);
    containers nested deeper than :data:`MAX_DEPTH`, or containing
    themselves, raise :class:`InvalidDataError`.
    """
    if type(value) in _CONTAINERS:
        return _thaw(value, 1, set())
    return value


def _thaw(value: Any, depth: int, active: set[int]) -> Any:
    """:func:`thaw` of the container ``value`` at level ``depth``."""
    if depth > _CONTAINER_DEPTH:
        raise InvalidDataError(f"data is not JSON: {_TOO_DEEP}")
    ident = id(value)
    if ident in active:
        raise InvalidDataError(f"data is not JSON: {_CYCLE}")
    active.add(ident)
    kinds = _CONTAINERS
    if type(value) is dict or type(value) is FrozenDict:
        copy: Any = {}
        for name, item in _dict_items(value):
            copy[name] = _thaw(item, depth + 1, active) if type(item) in kinds else item
    else:
        copy = []
        for item in value if type(value) is tuple else _list_iter(value):
            copy.append(_thaw(item, depth + 1, active) if type(item) in kinds else item)
    active.discard(ident)
    return copy


# orjson would quietly turn these into JSON (a dataclass into an object, a
# datetime or IntEnum into a string or number); make them reach ``_strict``.
_STRICT = (
    orjson.OPT_PASSTHROUGH_DATACLASS
    | orjson.OPT_PASSTHROUGH_DATETIME
    | orjson.OPT_PASSTHROUGH_SUBCLASS
)


def _strict(value: Any) -> Any:
    """orjson's ``default``: our own frozen containers serialise; nothing else does."""
    kind = type(value)
    # The raw storage, in C: children not yet read are still plain and
    # serialise natively, so encoding a view freezes nothing.
    if kind is FrozenDict:
        return dict(_dict_items(value))
    if kind is FrozenList:
        return list(_list_iter(value))
    raise TypeError(f"{kind.__name__} is not a JSON type")


def encode(value: Any) -> bytes:
    """Check that ``value`` is JSON and serialise it to compact UTF-8 JSON bytes."""
    return encode_with_copy(value)[0]


def encode_with_copy(value: Any) -> tuple[bytes, Any]:
    """Check and serialise ``value``; also return a fresh plain copy decoded from the bytes.

    The check runs at C speed: orjson encodes, decodes, and the copy must
    compare equal to the input. Anything orjson would coerce (NaN to null, a
    UUID or Enum to a string) fails that comparison and is then walked by
    :func:`freeze` for an exact error. Tuples are accepted as lists.
    """
    try:
        encoded = orjson.dumps(value, default=_strict, option=_STRICT)
    except (TypeError, orjson.JSONEncodeError) as exc:
        freeze(value)  # raises InvalidDataError naming the bad value
        raise InvalidDataError(f"data is not JSON: {exc}") from exc
    copy = orjson.loads(encoded)
    if copy != value:
        freeze(value)
    # orjson's output keeps its growth buffer (4 KiB for a 1 KiB document);
    # these bytes live as long as the session, so keep an exact-size copy.
    return bytes(memoryview(encoded)), copy


def encode_parsed(value: Any) -> bytes:
    """JSON bytes of a value orjson itself just parsed (an import line, say).

    Such a value holds only JSON types, so nothing can be coerced and the
    round trip of :func:`encode_with_copy` would only repeat the parse;
    orjson's own limits (nesting, integer range) still apply.
    """
    try:
        return orjson.dumps(value, option=_STRICT)
    except orjson.JSONEncodeError as exc:
        raise InvalidDataError(f"data is not JSON: {exc}") from exc


def decode(
    raw: bytes | bytearray | memoryview | str,
    context: str | Callable[[], str] = "document",
) -> Any:
    """Parse JSON bytes into plain, mutable containers.

    Bytes that do not parse raise :class:`CorruptDataError` naming ``context``
    (a callable is called only then): every document the package encodes
    parses, so only stored bytes that a writer other than this package gave
    a valid checksum get here.
    """
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        where = context if isinstance(context, str) else context()
        raise CorruptDataError(f"{where}: stored JSON does not decode: {exc}") from exc


def check_key(key: object) -> str:
    """Return ``key`` if it is a valid document key, else raise :class:`InvalidKeyError`."""
    if type(key) is not str:
        raise InvalidKeyError(f"key must be str, not {type(key).__name__}")
    if not key:
        raise InvalidKeyError("key must not be empty")
    if "\x00" in key:
        raise InvalidKeyError(f"key {key!r} contains NUL")
    try:
        size = len(key.encode("utf-8"))
    except UnicodeEncodeError as exc:  # lone surrogates
        raise InvalidKeyError(f"key {key!r} is not valid UTF-8") from exc
    if size > MAX_KEY_BYTES:
        raise InvalidKeyError(f"key is {size} bytes of UTF-8; the limit is {MAX_KEY_BYTES}")
    return key

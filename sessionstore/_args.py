"""Checks of call arguments and Store options, before any I/O.

Owns the rule of docs/api.md, "Bad arguments": a value of the wrong type
raises :class:`ArgumentTypeError` (a ``TypeError``), a value of the right
type but out of range raises :class:`InvalidArgumentError` (a
``ValueError``); both are :class:`SessionStoreError`. Every check names the
argument and shows the value (shortened), so the message says what to fix.
:mod:`sessionstore.config` and the :class:`~sessionstore.Store` facade both
use these, so that each rule is written once.

``bool`` is never a number here (``limit=True`` is a mistake, not 1), and an
int argument never takes a float (``read_version(k, 1.9)`` must not quietly
read version 1).
"""

from __future__ import annotations

import datetime
import math
import numbers
import operator
import re
import reprlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal, NoReturn, overload

from .errors import (
    ArgumentTypeError,
    InvalidArgumentError,
    InvalidKeyError,
    VersionNotFoundError,
)

__all__ = [
    "INT64_MAX",
    "MAX_REQUEST_ID_BYTES",
    "MAX_SECONDS",
    "check_bool",
    "check_callable",
    "check_callables",
    "check_int",
    "check_keys",
    "check_limit",
    "check_positive_int",
    "check_request_id",
    "check_seconds",
    "check_store_name",
    "check_timestamp",
    "check_version",
    "show",
]

INT64_MAX = 2**63 - 1
"""Largest value of a PostgreSQL ``bigint``: no count or number we send may exceed it."""

MAX_SECONDS = 1e9
"""Longest duration accepted (about 31 years).

Far beyond any sensible timeout, and far below what ``threading`` waits
(``threading.TIMEOUT_MAX``, about 292 years) and PostgreSQL intervals accept,
so a large but finite value fails here rather than in a wait or a statement.
"""

_STORE_NAME = re.compile(r"[A-Za-z0-9_.:-]{1,64}")

_repr = reprlib.Repr()
_repr.maxstring = 60
_repr.maxother = 60


def show(value: object) -> str:
    """``repr(value)``, shortened: for messages (a huge value must not flood a log)."""
    return _repr.repr(value)


def _wrong_type(name: str, expected: str, value: object) -> NoReturn:
    raise ArgumentTypeError(f"{name} must be {expected}, not {type(value).__name__} {show(value)}")


def _bad_value(name: str, expected: str, value: object) -> NoReturn:
    raise InvalidArgumentError(f"{name} must be {expected}, got {show(value)}")


def check_int(value: object, name: str, *, minimum: int = 0, maximum: int = INT64_MAX) -> int:
    """``value`` as an int within ``[minimum, maximum]``.

    Any integral number but ``bool`` is accepted (e.g. a NumPy integer); a
    float never is, even 2.0: an int argument given a float is a mistake.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        _wrong_type(name, "an int", value)
    number = operator.index(value)
    if not minimum <= number <= maximum:
        bound = f"at most {maximum}" if number > maximum else f"at least {minimum}"
        _bad_value(name, f"an int {bound}", value)
    return number


def check_positive_int(value: object, name: str, *, maximum: int = INT64_MAX) -> int:
    """``value`` as an int in ``1..maximum``."""
    return check_int(value, name, minimum=1, maximum=maximum)


def check_limit(limit: object, name: str = "limit") -> int:
    """A row limit: a positive int that PostgreSQL's ``LIMIT`` (a bigint) takes."""
    return check_positive_int(limit, name)


def check_version(version: object, context: str = "") -> int:
    """A version number: an int (never a float or bool: ``1.9`` is not version 1).

    Versions count from 1 and are PostgreSQL bigints, so an int outside
    ``1..INT64_MAX`` names no version: it raises :class:`VersionNotFoundError`
    (as the lookup would, but without asking the database, where a number
    beyond a bigint would be an error of its own). ``context`` (e.g.
    ``"store 'players' key 'k'"``) starts that message.
    """
    if isinstance(version, bool) or not isinstance(version, numbers.Integral):
        _wrong_type("version", "an int", version)
    number = operator.index(version)
    if not 1 <= number <= INT64_MAX:
        where = f"{context} " if context else ""
        raise VersionNotFoundError(f"{where}has no version {show(number)} (versions count from 1)")
    return number


@overload
def check_seconds(
    value: object,
    name: str,
    *,
    allow_none: Literal[False] = False,
    minimum: float = 0.0,
    exclusive: bool = False,
) -> float: ...


@overload
def check_seconds(
    value: object,
    name: str,
    *,
    allow_none: bool,
    minimum: float = 0.0,
    exclusive: bool = False,
) -> float | None: ...


def check_seconds(
    value: object,
    name: str,
    *,
    allow_none: bool = False,
    minimum: float = 0.0,
    exclusive: bool = False,
) -> float | None:
    """A duration in seconds as a float: a finite real ``>= minimum`` (``>`` if ``exclusive``).

    Ints and other real numbers are converted; ``bool`` is refused, and so
    are NaN (every comparison with it is false, so ``lock_timeout=nan`` would
    wait forever) and infinity. At most :data:`MAX_SECONDS`.
    """
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        _wrong_type(name, "a number of seconds" + (" or None" if allow_none else ""), value)
    try:
        seconds = float(value)
    except (OverflowError, ValueError):  # an int too large for a float, say
        _bad_value(name, f"at most {MAX_SECONDS:g} seconds", value)
    if not math.isfinite(seconds):
        _bad_value(name, "a finite number of seconds", value)
    too_small = seconds <= minimum if exclusive else seconds < minimum
    if too_small:
        relation = ">" if exclusive else ">="
        _bad_value(name, f"{relation} {minimum:g} seconds", value)
    if seconds > MAX_SECONDS:
        _bad_value(name, f"at most {MAX_SECONDS:g} seconds", value)
    return seconds


def check_timestamp(value: object, name: str) -> datetime.datetime | None:
    """``None`` or a timezone-aware :class:`datetime.datetime`, returned unchanged.

    A naive datetime is refused rather than guessed at: the database stores
    instants (``timestamptz``), and reading a naive value as UTC or as local
    time would each be wrong for someone.
    """
    if value is None:
        return None
    if not isinstance(value, datetime.datetime):
        _wrong_type(name, "a datetime.datetime or None", value)
    if value.utcoffset() is None:
        raise InvalidArgumentError(
            f"{name} must be a timezone-aware datetime, got the naive {show(value)}; "
            "pass e.g. datetime.now(timezone.utc) or value.replace(tzinfo=...)"
        )
    return value


def check_bool(value: object, name: str) -> bool:
    """``True`` or ``False`` exactly: ``1`` or ``"yes"`` is a mistake, not a flag."""
    if not isinstance(value, bool):
        _wrong_type(name, "True or False", value)
    return value


def check_callable(value: object, name: str, *, allow_none: bool = True) -> Any:
    """``value`` if it is callable (or None, when allowed)."""
    if (value is None and allow_none) or callable(value):
        return value
    _wrong_type(name, "a callable" + (" or None" if allow_none else ""), value)


def check_callables(value: object, name: str) -> tuple[Callable[..., Any], ...]:
    """An iterable of callables, as a tuple (so later changes to the caller's list do nothing)."""
    if (
        callable(value)
        or isinstance(value, str | bytes | Mapping)
        or not isinstance(value, Iterable)
    ):
        _wrong_type(name, "an iterable of callables, e.g. a tuple", value)
    items = tuple(value)
    for index, item in enumerate(items):
        check_callable(item, f"{name}[{index}]", allow_none=False)
    return items


def check_store_name(value: object, name: str = "name") -> str:
    """A store name: 1..64 characters of ``[A-Za-z0-9_.:-]``."""
    if not isinstance(value, str):
        _wrong_type(name, "a str", value)
    if not _STORE_NAME.fullmatch(value):
        _bad_value(name, "1..64 characters of [A-Za-z0-9_.:-]", value)
    return value


MAX_REQUEST_ID_BYTES = 512
"""Longest idempotency key, in bytes of UTF-8 (as long as a document key)."""


def check_request_id(value: object, name: str = "idempotency_key") -> str | None:
    """An idempotency key: None, or a str of 1 to 512 bytes of UTF-8 without NUL."""
    if value is None:
        return None
    if not isinstance(value, str):
        _wrong_type(name, "a str or None", value)
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidArgumentError(f"{name} {value!r} is not valid UTF-8") from None
    if not 0 < size <= MAX_REQUEST_ID_BYTES or "\x00" in value:
        raise InvalidArgumentError(
            f"{name} must be 1 to {MAX_REQUEST_ID_BYTES} bytes of UTF-8 without NUL, "
            f"not {show(value)}"
        )
    return value


def check_keys(keys: object) -> list[Any]:
    """Many keys: any iterable of them but a single str (each key is checked by the caller)."""
    if isinstance(keys, str | bytes) or not isinstance(keys, Iterable):
        raise InvalidKeyError(f"keys must be an iterable of keys, not {type(keys).__name__}")
    return list(keys)

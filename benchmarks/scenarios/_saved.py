"""Untimed setup of the batch scenarios: keys saved offline, and the same rows for a baseline."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import orjson

import sessionstore as ss

__all__ = ["check_coins", "raw_rows", "save_offline"]


def _number(number: int, document: dict[str, Any]) -> bool:
    document["user_id"] = number
    return True


def save_offline(store: ss.Store, keys: Sequence[str]) -> None:
    """Save a distinct document under every key, as an earlier process would have."""
    store.load_many(keys)
    for number, key in enumerate(keys):
        store.update(key, partial(_number, number))
    store.unload_many(keys)


def raw_rows(document: dict[str, Any], keys: Sequence[str]) -> list[tuple[str, str]]:
    """The same documents as ``save_offline``'s, serialised for a baseline table."""
    return [
        (key, orjson.dumps({**document, "user_id": number}).decode())
        for number, key in enumerate(keys)
    ]


def check_coins(store: ss.Store, keys: Sequence[str], expected: int, what: str) -> None:
    """Every key's saved document holds ``expected`` coins (no change lost); closes ``store``."""
    store.load_many(keys)
    wrong = sum(1 for key in keys if store.get(key)["coins"] != expected)
    store.close()
    if wrong:
        raise AssertionError(f"{what}: {wrong} of {len(keys)} keys lost a change")

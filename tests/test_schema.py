"""Schema adapters: callables, pydantic models and TypeAdapters, JSON Schema dicts."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pydantic
import pytest

import sessionstore as ss

TEMPLATE = {"coins": 0, "inventory": []}


def set_coins(n: int) -> Callable[[Any], bool]:
    def fn(data: Any) -> bool:
        data["coins"] = n
        return True

    return fn


class Profile(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")

    coins: int = pydantic.Field(ge=0)
    inventory: list[str]


JSON_SCHEMA = {
    "type": "object",
    "properties": {
        "coins": {"type": "integer", "minimum": 0},
        "inventory": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["coins", "inventory"],
    "additionalProperties": False,
}


def bool_check(data: Any) -> bool:
    return data["coins"] >= 0


def tuple_check(data: Any) -> tuple[bool, str]:
    if data["coins"] < 0:
        return False, "coins went negative"
    return True, ""


def none_or_raise_check(data: Any) -> None:
    if data["coins"] < 0:
        raise ValueError("negative coins are not allowed")


SCHEMAS: dict[str, Any] = {
    "callable bool": bool_check,
    "callable tuple": tuple_check,
    "callable none/raise": none_or_raise_check,
    "pydantic model": Profile,
    "pydantic TypeAdapter": pydantic.TypeAdapter(Profile),
    "json schema": JSON_SCHEMA,
}


@pytest.fixture(params=sorted(SCHEMAS))
def schema(request: pytest.FixtureRequest) -> Any:
    return SCHEMAS[request.param]


# -- every kind of schema --------------------------------------------------------------


def test_valid_changes_pass(make_store: Callable[..., ss.Store], schema: Any) -> None:
    store = make_store(schema=schema)
    store.load("k")
    assert store.update("k", set_coins(5)) is True
    assert store.update("k", lambda d: d["inventory"].append("sword") or True) is True
    store.save("k")
    assert store.peek("k") == {"coins": 5, "inventory": ["sword"]}


def test_invalid_update_changes_nothing(make_store: Callable[..., ss.Store], schema: Any) -> None:
    calls: list[Any] = []
    store = make_store(schema=schema, changed_callbacks=[lambda *a: calls.append(a)])
    store.load("k")
    store.update("k", set_coins(5))
    store.save("k")
    calls.clear()
    versions = len(store.list_versions("k"))
    with pytest.raises(ss.SchemaValidationError):
        store.update("k", set_coins(-1))
    with pytest.raises(ss.SchemaValidationError):
        store.update_immutable("k", lambda d: {**d, "coins": -1})
    with pytest.raises(ss.SchemaValidationError):
        store.tx(["k"], lambda m: set_coins(-1)(m["k"]))
    with pytest.raises(ss.SchemaValidationError):
        store.tx_immutable(["k"], lambda m: {"k": {**m["k"], "coins": -1}})
    assert store.get("k") == {"coins": 5, "inventory": []}
    assert store.is_saved("k") is True
    assert calls == []
    store.save("k")
    assert len(store.list_versions("k")) == versions
    assert store.peek("k") == {"coins": 5, "inventory": []}
    # The session keeps working.
    assert store.update("k", set_coins(6)) is True
    assert store.get("k")["coins"] == 6


def test_invalid_template_names_the_store(
    make_store: Callable[..., ss.Store], schema: Any, store_name: str
) -> None:
    with pytest.raises(ss.SchemaValidationError, match=store_name):
        make_store({"coins": -3, "inventory": []}, schema=schema)


def test_stored_data_failing_the_schema_fails_the_load(
    make_store: Callable[..., ss.Store], schema: Any
) -> None:
    loose = make_store()
    loose.load("k")
    loose.update("k", set_coins(-7))
    loose.unload("k")
    strict = make_store(schema=schema)
    with pytest.raises(ss.SchemaValidationError):
        strict.load("k")
    assert strict.probe_lock_active("k") is False
    with pytest.raises(ss.KeyNotLoadedError):
        strict.get("k")
    assert loose.peek("k") == {"coins": -7, "inventory": []}


def test_imported_data_failing_the_schema_fails_the_load(
    make_store: Callable[..., ss.Store], schema: Any
) -> None:
    store = make_store(schema=schema, import_legacy_data=lambda key: {"coins": -1, "inventory": []})
    with pytest.raises(ss.SchemaValidationError):
        store.load("k")
    assert store.probe_lock_active("k") is False
    assert store.peek("k") is None


def test_migrated_data_failing_the_schema_fails_the_load(
    make_store: Callable[..., ss.Store], schema: Any
) -> None:
    loose = make_store()
    loose.load("k")
    loose.update("k", set_coins(1))
    loose.unload("k")
    strict = make_store(
        schema=schema, migrations=[ss.transform("debt", lambda d: {**d, "coins": d["coins"] - 10})]
    )
    with pytest.raises(ss.SchemaValidationError):
        strict.load("k")
    assert strict.probe_lock_active("k") is False
    assert [v.version for v in loose.list_versions("k")] == [1]
    assert loose.peek("k") == {"coins": 1, "inventory": []}


# -- callables -------------------------------------------------------------------------


def test_callable_receives_the_new_data(make_store: Callable[..., ss.Store]) -> None:
    seen: list[Any] = []

    def check(data: Any) -> bool:
        seen.append(ss.thaw(data))
        return True

    store = make_store(schema=check)
    store.load("k")
    seen.clear()
    store.update("k", set_coins(3))
    assert seen == [{"coins": 3, "inventory": []}]


def test_callable_false(make_store: Callable[..., ss.Store]) -> None:
    store = make_store(schema=lambda d: d["coins"] < 10)
    store.load("k")
    with pytest.raises(ss.SchemaValidationError, match="'k'"):
        store.update("k", set_coins(10))
    assert store.get("k")["coins"] == 0


def test_callable_tuple_reason_is_in_the_message(make_store: Callable[..., ss.Store]) -> None:
    store = make_store(schema=tuple_check)
    store.load("k")
    with pytest.raises(ss.SchemaValidationError, match="coins went negative"):
        store.update("k", set_coins(-1))


def test_callable_true_tuple_is_valid(make_store: Callable[..., ss.Store]) -> None:
    store = make_store(schema=lambda d: (True, "fine"))
    store.load("k")
    assert store.update("k", set_coins(-1)) is True
    assert store.get("k")["coins"] == -1


def test_callable_none_is_valid(make_store: Callable[..., ss.Store]) -> None:
    store = make_store(schema=lambda d: None)
    store.load("k")
    assert store.update("k", set_coins(-1)) is True
    assert store.get("k")["coins"] == -1


def test_callable_raising_is_invalid_and_chained(make_store: Callable[..., ss.Store]) -> None:
    boom = ValueError("negative coins are not allowed")

    def check(data: Any) -> None:
        if data["coins"] < 0:
            raise boom

    store = make_store(schema=check)
    store.load("k")
    with pytest.raises(ss.SchemaValidationError, match="negative coins are not allowed") as info:
        store.update("k", set_coins(-1))
    assert info.value.__cause__ is boom
    assert store.get("k")["coins"] == 0


def test_schema_validation_error_is_a_value_error() -> None:
    assert issubclass(ss.SchemaValidationError, ss.SessionStoreError)
    assert issubclass(ss.SchemaValidationError, ValueError)


# -- pydantic --------------------------------------------------------------------------


def test_pydantic_message_names_the_field(make_store: Callable[..., ss.Store]) -> None:
    store = make_store(schema=Profile)
    store.load("k")
    with pytest.raises(ss.SchemaValidationError, match="coins"):
        store.update("k", set_coins(-1))
    with pytest.raises(ss.SchemaValidationError, match="inventory"):
        store.update("k", lambda d: d.update(inventory=[1]) or True)
    with pytest.raises(ss.SchemaValidationError, match="extra"):
        store.update("k", lambda d: d.update(extra=1) or True)


def test_pydantic_stores_the_data_not_the_model_output(make_store: Callable[..., ss.Store]) -> None:
    class WithDefault(pydantic.BaseModel):
        coins: int
        inventory: list[str] = []
        level: int = 1

    store = make_store(schema=WithDefault)
    store.load("k")
    store.update("k", set_coins(2))
    assert store.get("k") == {"coins": 2, "inventory": []}, "defaults must not be injected"


def test_type_adapter_of_plain_types(make_store: Callable[..., ss.Store]) -> None:
    adapter = pydantic.TypeAdapter(dict[str, int])
    store = make_store({"a": 1}, schema=adapter)
    store.load("k")
    assert store.update("k", lambda d: d.update(b=2) or True) is True
    with pytest.raises(ss.SchemaValidationError):
        store.update("k", lambda d: d.update(c=[1]) or True)
    assert store.get("k") == {"a": 1, "b": 2}
    with pytest.raises(ss.SchemaValidationError):
        make_store({"a": "not an int"}, schema=adapter)


# -- JSON Schema -----------------------------------------------------------------------


def test_json_schema_message_names_the_path(make_store: Callable[..., ss.Store]) -> None:
    store = make_store(schema=JSON_SCHEMA)
    store.load("k")
    with pytest.raises(ss.SchemaValidationError, match="coins"):
        store.update("k", set_coins(-1))
    with pytest.raises(ss.SchemaValidationError, match="inventory"):
        store.update("k", lambda d: d["inventory"].append(5) or True)
    assert store.get("k") == TEMPLATE


def test_invalid_json_schema_is_rejected_at_construction(
    make_store: Callable[..., ss.Store],
) -> None:
    with pytest.raises((TypeError, ValueError)):
        make_store(schema={"type": 12})


def test_unsupported_schema_kind_is_rejected(make_store: Callable[..., ss.Store]) -> None:
    with pytest.raises(TypeError):
        make_store(schema=42)
    with pytest.raises(TypeError):
        make_store(schema="not a schema")


def test_no_schema_accepts_any_json(make_store: Callable[..., ss.Store]) -> None:
    store = make_store(schema=None)
    store.load("k")
    assert store.update_immutable("k", lambda d: ["anything", {"goes": None}]) is True
    assert store.get("k") == ["anything", {"goes": None}]

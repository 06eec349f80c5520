"""Named migration steps: applied in order on load, recorded, run once."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

import sessionstore as ss

OLD_SHAPE = {"coins": 5, "inventory": ["sword", "shield"]}
NEW_SHAPE = {
    "coins": 5,
    "gems": 0,
    "inventory": [{"id": "sword", "count": 1}, {"id": "shield", "count": 1}],
}
NEW_TEMPLATE = {"coins": 0, "gems": 0, "inventory": []}


class Steps:
    """The steps of a newer deploy, counting how often each runs and in which order."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.order: list[str] = []

    def inventory_v2(self, data: Any) -> Any:
        self.calls["inventory_v2"] += 1
        self.order.append("inventory_v2")
        assert "gems" in data, "add_gems must run before inventory_v2"
        data["inventory"] = [{"id": item, "count": 1} for item in data["inventory"]]
        return data

    def counted_add(self, data: Any) -> Any:
        self.calls["add_gems"] += 1
        self.order.append("add_gems")
        return data

    def steps(self) -> list[ss.MigrationStep]:
        add = ss.add_fields("add_gems", {"gems": 0})
        counted = ss.transform("add_gems", lambda d: add.apply(self.counted_add(d)))
        return [counted, ss.transform("inventory_v2", self.inventory_v2)]


def save_old(make_store: Callable[..., ss.Store], key: str = "k", data: Any = OLD_SHAPE) -> None:
    old = make_store()
    old.load(key)
    old.update_immutable(key, lambda d: data)
    old.unload(key)


# -- applying --------------------------------------------------------------------------


def test_steps_apply_in_order_on_load_and_are_recorded(make_store: Callable[..., ss.Store]) -> None:
    save_old(make_store)
    steps = Steps()
    store = make_store(NEW_TEMPLATE, migrations=steps.steps())
    store.load("k")
    assert store.get("k") == NEW_SHAPE
    assert steps.order == ["add_gems", "inventory_v2"]
    assert store.is_saved("k") is False, "migrated data must be saved"
    store.save("k")
    newest = store.list_versions("k")[0]
    assert newest.version == 2
    assert tuple(newest.migrations) == ("add_gems", "inventory_v2")
    assert store.peek("k") == NEW_SHAPE


def test_migrations_are_saved_on_unload_without_an_update(
    make_store: Callable[..., ss.Store],
) -> None:
    save_old(make_store)
    steps = Steps()
    store = make_store(NEW_TEMPLATE, migrations=steps.steps())
    store.load("k")
    store.unload("k")
    versions = store.list_versions("k")
    assert [v.version for v in versions] == [2, 1]
    assert tuple(versions[0].migrations) == ("add_gems", "inventory_v2")
    assert tuple(versions[1].migrations) == ()
    assert store.read_version("k", 2)[0] == NEW_SHAPE


def test_steps_run_once_across_reloads(make_store: Callable[..., ss.Store]) -> None:
    save_old(make_store)
    steps = Steps()
    store = make_store(NEW_TEMPLATE, migrations=steps.steps())
    store.load("k")
    store.unload("k")
    store.load("k")
    store.update("k", lambda d: d.update(coins=6) or True)
    store.unload("k")
    other = make_store(NEW_TEMPLATE, migrations=steps.steps())
    other.load("k")
    assert other.get("k") == {**NEW_SHAPE, "coins": 6}
    assert steps.calls == {"add_gems": 1, "inventory_v2": 1}
    assert other.is_saved("k") is True
    other.unload("k")
    assert len(other.list_versions("k")) == 3


def test_only_missing_steps_run(make_store: Callable[..., ss.Store]) -> None:
    first = Steps()
    v1 = make_store(NEW_TEMPLATE, migrations=first.steps()[:1])
    save_old(make_store)
    v1.load("k")
    v1.unload("k")
    assert first.calls == {"add_gems": 1}
    assert tuple(v1.list_versions("k")[0].migrations) == ("add_gems",)
    second = Steps()
    v2 = make_store(NEW_TEMPLATE, migrations=second.steps())
    v2.load("k")
    assert second.calls == {"inventory_v2": 1}
    assert v2.get("k") == NEW_SHAPE
    v2.save("k")
    assert tuple(v2.list_versions("k")[0].migrations) == ("add_gems", "inventory_v2")


def test_add_fields_keeps_existing_values(make_store: Callable[..., ss.Store]) -> None:
    save_old(make_store, data={"coins": 1, "inventory": [], "gems": 7})
    store = make_store(NEW_TEMPLATE, migrations=[ss.add_fields("add", {"gems": 0, "level": 1})])
    store.load("k")
    assert store.get("k") == {"coins": 1, "inventory": [], "gems": 7, "level": 1}


def test_add_fields_defaults_are_deep_copied(make_store: Callable[..., ss.Store]) -> None:
    defaults = {"bag": [], "meta": {"tags": []}}
    step = ss.add_fields("add_bag", defaults)
    defaults["bag"].append("leaked")
    defaults["meta"]["tags"].append("leaked")
    save_old(make_store, "a", {"coins": 1})
    save_old(make_store, "b", {"coins": 2})
    store = make_store({"coins": 0, "bag": [], "meta": {"tags": []}}, migrations=[step])
    store.load("a")
    store.load("b")
    assert store.get("a") == {"coins": 1, "bag": [], "meta": {"tags": []}}
    store.update("a", lambda d: d["bag"].append("x") or d["meta"]["tags"].append("y") or True)
    assert store.get("b") == {"coins": 2, "bag": [], "meta": {"tags": []}}
    save_old(make_store, "c", {"coins": 3})
    store.load("c")
    assert store.get("c") == {"coins": 3, "bag": [], "meta": {"tags": []}}


def test_transform_may_return_new_data(make_store: Callable[..., ss.Store]) -> None:
    save_old(make_store)
    store = make_store(
        {"wallet": 0}, migrations=[ss.transform("rename", lambda d: {"wallet": d["coins"]})]
    )
    store.load("k")
    assert store.get("k") == {"wallet": 5}


def test_read_version_returns_stored_unmigrated_data(make_store: Callable[..., ss.Store]) -> None:
    save_old(make_store)
    store = make_store(NEW_TEMPLATE, migrations=Steps().steps())
    store.load("k")
    store.save("k")
    data, info = store.read_version("k", 1)
    assert data == OLD_SHAPE
    assert tuple(info.migrations) == ()


# -- new keys and legacy imports -------------------------------------------------------


def test_new_key_from_template_counts_as_migrated(make_store: Callable[..., ss.Store]) -> None:
    steps = Steps()
    store = make_store(NEW_TEMPLATE, migrations=steps.steps())
    store.load("k")
    assert store.get("k") == NEW_TEMPLATE
    assert steps.calls == {}
    store.update("k", lambda d: d.update(coins=1) or True)
    store.unload("k")
    assert tuple(store.list_versions("k")[0].migrations) == ("add_gems", "inventory_v2")
    store.load("k")
    assert steps.calls == {}
    assert store.get("k") == {**NEW_TEMPLATE, "coins": 1}


def test_imported_legacy_data_runs_every_step_and_is_saved(
    make_store: Callable[..., ss.Store],
) -> None:
    steps = Steps()
    store = make_store(
        NEW_TEMPLATE, migrations=steps.steps(), import_legacy_data=lambda key: dict(OLD_SHAPE)
    )
    store.load("k")
    assert store.get("k") == NEW_SHAPE
    assert steps.calls == {"add_gems": 1, "inventory_v2": 1}
    assert store.is_saved("k") is False
    store.unload("k")
    versions = store.list_versions("k")
    assert [v.version for v in versions] == [1]
    assert tuple(versions[0].migrations) == ("add_gems", "inventory_v2")
    assert store.peek("k") == NEW_SHAPE
    store.load("k")
    assert steps.calls == {"add_gems": 1, "inventory_v2": 1}


# -- failures --------------------------------------------------------------------------


def test_unknown_stored_migration_fails_the_load(make_store: Callable[..., ss.Store]) -> None:
    newer = make_store(
        NEW_TEMPLATE, migrations=[ss.add_fields("add_gems", {"gems": 0}), ss.add_fields("v3", {})]
    )
    save_old(make_store)
    newer.load("k")
    newer.unload("k")
    before = newer.list_versions("k")
    older = make_store(NEW_TEMPLATE, migrations=[ss.add_fields("add_gems", {"gems": 0})])
    with pytest.raises(ss.MigrationError, match="v3"):
        older.load("k")
    with pytest.raises(ss.KeyNotLoadedError):
        older.get("k")
    assert older.probe_lock_active("k") is False
    assert newer.list_versions("k") == before
    assert newer.peek("k") == {**OLD_SHAPE, "gems": 0}
    assert tuple(newer.list_versions("k")[0].migrations) == ("add_gems", "v3")
    newer_again = make_store(
        NEW_TEMPLATE,
        migrations=[ss.add_fields("add_gems", {"gems": 0}), ss.add_fields("v3", {})],
        lock_timeout=0,
    )
    newer_again.load("k")
    assert newer_again.get("k") == {**OLD_SHAPE, "gems": 0}


def test_raising_step_fails_the_load_and_releases_the_lease(
    make_store: Callable[..., ss.Store],
) -> None:
    save_old(make_store)
    boom = KeyError("inventory")

    def broken(data: Any) -> Any:
        data["coins"] = 999  # a half-done change must not survive
        raise boom

    store = make_store(
        migrations=[ss.add_fields("add_gems", {"gems": 0}), ss.transform("bad", broken)]
    )
    with pytest.raises(ss.MigrationError, match="bad") as info:
        store.load("k")
    assert info.value.__cause__ is boom
    with pytest.raises(ss.KeyNotLoadedError):
        store.get("k")
    assert store.probe_lock_active("k") is False
    other = make_store(lock_timeout=0)
    other.load("k")
    assert other.get("k") == OLD_SHAPE
    assert [v.version for v in other.list_versions("k")] == [1]


def test_raising_step_in_an_import_fails_the_load(make_store: Callable[..., ss.Store]) -> None:
    def broken(data: Any) -> Any:
        raise RuntimeError("cannot convert")

    store = make_store(
        migrations=[ss.transform("bad", broken)], import_legacy_data=lambda key: dict(OLD_SHAPE)
    )
    with pytest.raises(ss.MigrationError):
        store.load("k")
    assert store.probe_lock_active("k") is False
    assert store.peek("k") is None


def test_duplicate_step_names_are_rejected(make_store: Callable[..., ss.Store]) -> None:
    with pytest.raises(ValueError, match="same"):
        make_store(migrations=[ss.add_fields("same", {"a": 1}), ss.transform("same", lambda d: d)])
    with pytest.raises(ValueError, match="dup"):
        make_store(migrations=[ss.add_fields("dup", {}), ss.add_fields("dup", {})])


def test_malformed_steps_are_rejected(make_store: Callable[..., ss.Store]) -> None:
    with pytest.raises(TypeError):
        make_store(migrations=[lambda d: d])
    with pytest.raises(ValueError):
        make_store(migrations=[ss.add_fields("", {"a": 1})])
    with pytest.raises(TypeError):
        ss.add_fields("not a dict", ["a"])  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        ss.transform("not callable", 42)  # type: ignore[arg-type]
    with pytest.raises(ss.InvalidDataError):
        ss.add_fields("not json", {"a": {1, 2}})


def test_a_transform_that_changes_in_place_and_returns_none_keeps_the_change(
    make_store: Callable[..., ss.Store],
) -> None:
    """``transform`` may change the copy in place; returning None must not make it null."""

    def rename(data: Any) -> None:
        data["gold"] = data.pop("coins")

    old = make_store(template={"coins": 0})
    old.load("k")
    old.update("k", lambda d: d.update(coins=5) is None)
    old.unload("k")
    new = make_store(template={"gold": 0}, migrations=[ss.transform("rename", rename)])
    new.load("k")
    assert new.get("k") == {"gold": 5}


@pytest.mark.parametrize(
    "build",
    [lambda: ss.add_fields("x", [1]), lambda: ss.transform("x", 1), lambda: ss.add_fields(1, {})],
)
def test_bad_migration_steps_are_argument_type_errors(build: Callable[[], Any]) -> None:
    with pytest.raises(ss.ArgumentTypeError):
        build()

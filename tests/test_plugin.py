"""The pytest plugin as a user's own project sees it (run by pytester in a separate directory).

A user's tests get ``sessionstore_factory`` (Stores in a schema of the test's
own, closed after it) without any conftest of theirs: data one test saves is
invisible in the next.
"""

from __future__ import annotations

import pytest

pytest_plugins = ["pytester"]

USER_TESTS = """
import sessionstore as ss


def test_saves_a_key(sessionstore_factory):
    store = sessionstore_factory(name="players", template={"coins": 0})
    with store.session("p1") as s:
        s.update(lambda d: d.update(coins=5) is None)
    assert store.peek("p1") == {"coins": 5}


def test_sees_nothing_of_the_previous_test(sessionstore_factory, sessionstore_test_schema):
    store = sessionstore_factory(name="players", template={"coins": 0})
    assert store.peek("p1") is None
    assert store.config.db_schema == sessionstore_test_schema


def test_stores_are_closed_after_the_test(sessionstore_factory):
    global LEFT_OPEN
    LEFT_OPEN = sessionstore_factory(name="players", template={})
    LEFT_OPEN.load("k")


def test_the_previous_store_was_closed():
    import pytest

    with pytest.raises(ss.StoreClosedError):
        LEFT_OPEN.get("k")
"""


def test_a_users_project_gets_fresh_schemas_and_closed_stores(
    pytester: pytest.Pytester, sessionstore_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SESSIONSTORE_TEST_DSN", sessionstore_dsn)  # reuse this run's server
    pytester.makepyfile(test_user=USER_TESTS)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-q")
    result.assert_outcomes(passed=4)

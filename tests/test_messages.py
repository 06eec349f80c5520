"""Messages to keys (docs/messages.md): durable on send, applied once, in order.

Sender and holder are two Stores of the same name (two holders, as two
processes would be); across real processes, ``kill -9`` between apply and
save included, in test_save_path_processes.py.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from conftest import Sql, wait_until

import sessionstore as ss

MakeStore = Callable[..., ss.Store]


class Inbox:
    """A message_handler that files gifts (and declines or fails on request)."""

    def __init__(self) -> None:
        self.seen: list[Any] = []
        self.threads: set[str] = set()
        self.arrived = threading.Event()

    def __call__(self, key: str, data: dict[str, Any], message: Any) -> bool:
        self.seen.append(message)
        self.threads.add(threading.current_thread().name)
        self.arrived.set()
        if message.get("fail"):
            raise RuntimeError("handler failed")
        if message.get("decline"):
            return False
        data.setdefault("gifts", []).append(message["gift"])
        return True


def pending(sql: Sql, key: str) -> list[Any]:
    return [
        row.body
        for row in sql.rows(
            "SELECT body FROM {s}.messages WHERE store = :store AND key = :key ORDER BY id",
            key=key,
        )
    ]


def test_a_message_reaches_a_live_holder_at_once_and_is_deleted_with_the_save(
    make_store: MakeStore, sql: Sql
) -> None:
    inbox = Inbox()
    holder = make_store(message_handler=inbox)
    sender = make_store()
    holder.load("p")
    started = time.monotonic()
    message_id = sender.send_message("p", {"gift": "sword"})
    assert isinstance(message_id, int)
    wait_until(lambda: holder.get("p").get("gifts") == ["sword"], 5.0, "the gift to arrive")
    took = time.monotonic() - started
    assert took < 5.0
    assert all(name.startswith("sessionstore-callbacks-") for name in inbox.threads)
    assert pending(sql, "p") == [{"gift": "sword"}], "deleted only by the save carrying it"
    assert not holder.is_saved("p")
    holder.save("p")
    assert pending(sql, "p") == []
    assert sender.peek("p")["gifts"] == ["sword"]


def test_messages_to_a_key_nobody_holds_are_applied_at_its_load_in_order(
    make_store: MakeStore, sql: Sql
) -> None:
    sender = make_store()
    for gift in ("a", "b", "c"):
        sender.send_message("p", {"gift": gift})
    assert [m["gift"] for m in pending(sql, "p")] == ["a", "b", "c"]
    changed: list[Any] = []
    holder = make_store(
        message_handler=Inbox(), changed_callbacks=[lambda k, new, old: changed.append(new)]
    )
    holder.load("p")
    assert holder.get("p")["gifts"] == ["a", "b", "c"]
    # Applied before the load's changed callback, which sees them all.
    assert [ss.thaw(c) for c in changed] == [
        {"coins": 0, "inventory": [], "gifts": ["a", "b", "c"]}
    ]
    holder.unload("p")
    assert pending(sql, "p") == []
    assert sender.peek("p")["gifts"] == ["a", "b", "c"]


def test_a_declined_message_stays_waiting_until_the_next_load(
    make_store: MakeStore, sql: Sql
) -> None:
    inbox = Inbox()
    holder = make_store(message_handler=inbox)
    holder.load("p")
    sender = make_store()
    sender.send_message("p", {"gift": "x", "decline": True})
    sender.send_message("p", {"gift": "y"})
    wait_until(lambda: holder.get("p").get("gifts") == ["y"], 5.0, "the second gift")
    holder.save("p")
    assert pending(sql, "p") == [{"gift": "x", "decline": True}]
    assert len(inbox.seen) == 2, "a declined message is not offered again while loaded"
    holder.unload("p")
    holder.load("p")
    assert len(inbox.seen) == 3, "offered again at the next load"
    assert pending(sql, "p") == [{"gift": "x", "decline": True}]


def test_a_handler_that_raises_keeps_the_message_and_is_logged(
    make_store: MakeStore, sql: Sql, caplog: pytest.LogCaptureFixture
) -> None:
    holder = make_store(message_handler=Inbox())
    holder.load("p")
    with caplog.at_level("ERROR", logger="sessionstore"):
        make_store().send_message("p", {"gift": "x", "fail": True})
        wait_until(
            lambda: any("message_handler failed" in r.getMessage() for r in caplog.records),
            5.0,
            "the failure to be logged",
        )
    holder.save("p")
    assert pending(sql, "p") == [{"gift": "x", "fail": True}]
    assert "gifts" not in holder.get("p")


def test_a_handler_that_calls_back_into_the_store_gets_transform_error(
    make_store: MakeStore, sql: Sql, caplog: pytest.LogCaptureFixture
) -> None:
    holder: ss.Store

    def reentrant(key: str, data: Any, message: Any) -> bool:
        holder.save(key)
        return True

    holder = make_store(message_handler=reentrant)
    holder.load("p")
    with caplog.at_level("ERROR", logger="sessionstore"):
        make_store().send_message("p", {"gift": "x"})
        wait_until(
            lambda: any(
                r.exc_info and isinstance(r.exc_info[1], ss.TransformError) for r in caplog.records
            ),
            5.0,
            "the refused call to be logged",
        )
    holder.save("p")  # the key is not stuck
    assert len(pending(sql, "p")) == 1


def test_the_queue_of_a_key_is_bounded(make_store: MakeStore, sql: Sql) -> None:
    sender = make_store(max_pending_messages=3)
    ids = [sender.send_message("p", {"n": n}) for n in range(3)]
    assert ids == sorted(ids)
    with pytest.raises(ss.MessageQueueFullError):
        sender.send_message("p", {"n": 3})
    assert len(pending(sql, "p")) == 3
    sender.send_message("q", {"n": 0})  # other keys are not affected


def test_concurrent_senders_never_overshoot_the_bound(make_store: MakeStore, sql: Sql) -> None:
    sender = make_store(max_pending_messages=10)
    outcomes: list[str] = []
    barrier = threading.Barrier(8)

    def send() -> None:
        barrier.wait()
        for _ in range(4):
            try:
                sender.send_message("p", {"n": 1})
                outcomes.append("sent")
            except ss.MessageQueueFullError:
                outcomes.append("full")

    threads = [threading.Thread(target=send) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert outcomes.count("sent") == 10
    assert len(pending(sql, "p")) == 10


def test_bad_messages_are_refused(store: ss.Store, sql: Sql) -> None:
    with pytest.raises(ss.InvalidDataError):
        store.send_message("p", {"x": float("nan")})
    with pytest.raises(ss.InvalidDataError):
        store.send_message("p", {1: "not a str key"})
    with pytest.raises(ss.InvalidKeyError):
        store.send_message("", {"x": 1})
    assert pending(sql, "p") == []


def test_a_message_sent_while_the_key_loads_is_delivered(make_store: MakeStore) -> None:
    """The NOTIFY may come between the load's read and the key becoming LIVE."""
    entered, release = threading.Event(), threading.Event()

    def slow_legacy(key: str) -> Any:
        entered.set()
        assert release.wait(10)
        return None

    holder = make_store(message_handler=Inbox(), import_legacy_data=slow_legacy)
    loading = threading.Thread(target=holder.load, args=("p",))
    loading.start()
    assert entered.wait(10)
    make_store().send_message("p", {"gift": "early"})
    early = holder._open_core().messages._early
    wait_until(lambda: "p" in early, 5.0, "the NOTIFY to arrive while the key loads")
    release.set()
    loading.join(10)
    wait_until(lambda: holder.get("p").get("gifts") == ["early"], 5.0, "the early gift")


def test_messages_whose_notify_was_missed_are_found_by_autosave(
    make_store: MakeStore, sql: Sql
) -> None:
    holder = make_store(message_handler=Inbox(), autosave_interval=0.3)
    holder.load("p")
    # Inserted behind the library's back: no NOTIFY is sent.
    sql.execute(
        "INSERT INTO {s}.messages (store, key, body, nonce) "
        "VALUES (:store, 'p', '{\"gift\": \"quiet\"}', gen_random_uuid())"
    )
    wait_until(lambda: holder.get("p").get("gifts") == ["quiet"], 5.0, "the sweep to deliver it")
    wait_until(lambda: pending(sql, "p") == [], 5.0, "autosave to delete it")


def test_erase_deletes_the_keys_messages(make_store: MakeStore, sql: Sql) -> None:
    store = make_store()
    store.send_message("p", {"gift": "x"})
    store.erase("p")
    assert pending(sql, "p") == []


def test_without_a_handler_messages_wait(make_store: MakeStore, sql: Sql) -> None:
    holder = make_store()
    holder.load("p")
    holder.send_message("p", {"gift": "x"})
    holder.unload("p")
    assert pending(sql, "p") == [{"gift": "x"}]
    later = make_store(message_handler=Inbox())
    later.load("p")
    assert later.get("p")["gifts"] == ["x"]


def test_messages_announced_while_the_control_connection_was_down_are_found_on_reconnect(
    make_store: MakeStore, sql: Sql
) -> None:
    holder = make_store(message_handler=Inbox(), instant_takeover=True)
    holder.load("p")
    # Stored without a NOTIFY, as if it were sent while the holder was not listening.
    sql.execute(
        "INSERT INTO {s}.messages (store, key, body, nonce) "
        "VALUES (:store, 'p', '{\"gift\": \"lost\"}', gen_random_uuid())"
    )
    control = sql.scalar(
        "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted AND objsubid = 2 "
        "AND classid = (hashtext('sessionstore.holder')::bigint & 4294967295)::oid "
        "AND objid = (hashtext(:holder)::bigint & 4294967295)::oid",
        holder=holder.holder,
    )
    assert control, "the holder's control connection holds its advisory lock"
    assert sql.scalar("SELECT pg_terminate_backend(CAST(:pid AS integer))", pid=control)
    wait_until(lambda: holder.get("p").get("gifts") == ["lost"], 5.0, "delivery on reconnect")


def test_a_save_right_after_the_handler_deletes_the_message_with_its_effect(
    make_store: MakeStore, sql: Sql, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A save that runs the moment the handler's update returns carries the deletion too.

    Found by the chaos suite: the message was recorded for deletion only after
    the update released the key, so a save in between stored the gift, kept
    the row, and the next holder applied the gift a second time.
    """
    holder = make_store(message_handler=Inbox())
    holder.load("p")
    original = ss.store.Session.update
    saved_between = threading.Event()

    def update_then_save(self: Any, fn: Any, *args: Any, **kwargs: Any) -> Any:
        outcome = original(self, fn, *args, **kwargs)
        if threading.current_thread().name.startswith("sessionstore-callbacks-"):
            saver = threading.Thread(target=holder.save, args=("p",))
            saver.start()  # another thread saves before the delivery goes on
            saver.join(10)
            saved_between.set()
        return outcome

    monkeypatch.setattr(ss.store.Session, "update", update_then_save)
    make_store().send_message("p", {"gift": "x"})
    assert saved_between.wait(10)
    monkeypatch.undo()
    holder.unload("p")
    assert pending(sql, "p") == []
    heir = make_store(message_handler=Inbox())
    heir.load("p")
    assert heir.get("p")["gifts"] == ["x"]


def test_a_retried_send_whose_commit_was_not_acknowledged_stores_one_message(
    store: ss.Store, sql: Sql
) -> None:
    """The repository retries a send with the same nonce: the retry finds the first row."""
    from sessionstore._storage import messages

    with sql.engine.connect() as conn:
        first = messages.send(conn, sql.schema, sql.store, "p", '{"gift": 1}', 10, NONCE)
        conn.commit()
        again = messages.send(conn, sql.schema, sql.store, "p", '{"gift": 1}', 10, NONCE)
        conn.commit()
    assert first is not None and again == first
    assert pending(sql, "p") == [{"gift": 1}]


NONCE = "8f0e6a51-3a0c-4f47-9a53-1f2b7d3c9e10"

"""A typed Store: mypy checks what the transforms do with the documents.

``ss.Store[Player]`` makes ``get`` and ``peek`` return a ``Player`` and
``update`` take a ``Callable[[Player], bool]``; run
``mypy --strict examples/typed_player.py`` to see it checked. At run time the
documents are still frozen (read-only) JSON.
"""

from __future__ import annotations

from typing import TypedDict

import sessionstore as ss


class Player(TypedDict):
    coins: int
    inventory: list[str]


def reward(player: Player) -> bool:
    player["coins"] += 10
    player["inventory"].append("sword")
    return True


def main() -> None:
    with ss.Store[Player]("players", {"coins": 0, "inventory": []}) as store:
        with store.session("player:1") as session:
            session.update(reward)
            coins: int = session.get()["coins"]
            print(f"player:1 has {coins} coins")
        saved = store.peek("player:1")
        if saved is not None:
            print("first item:", saved["inventory"][0])


if __name__ == "__main__":
    main()

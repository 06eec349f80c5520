from typing import TypedDict

import sessionstore as ss


class Player(TypedDict):
    coins: int


def add(player: Player) -> None:
    player["coins"] += 1


store = ss.Store[Player]("players", {"coins": 0})
store.update("p1", add)  # E: a transform must return bool

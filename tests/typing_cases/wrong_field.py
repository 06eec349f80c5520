from typing import TypedDict

import sessionstore as ss


class Player(TypedDict):
    coins: int


def add(player: Player) -> bool:
    player["gold"] = 1  # E: no such key
    return True


store = ss.Store[Player]("players", {"coins": 0})
store.update("p1", add)

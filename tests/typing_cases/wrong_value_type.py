from typing import TypedDict

import sessionstore as ss


class Player(TypedDict):
    coins: int


store = ss.Store[Player]("players", {"coins": 0})
name: str = store.get("p1")["coins"]  # E: int is not str

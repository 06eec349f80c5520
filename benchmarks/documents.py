"""Realistic documents: a game player's profile, grown to a target JSON size."""

from __future__ import annotations

import random
from typing import Any

import orjson

__all__ = ["bump", "json_size", "player_profile", "transfer"]

_ITEMS = ("sword", "shield", "potion", "bow", "arrow", "helmet", "ring", "amulet", "scroll")
_RARITY = ("common", "uncommon", "rare", "epic", "legendary")


def json_size(document: Any) -> int:
    return len(orjson.dumps(document))


def _item(rng: random.Random, index: int) -> dict[str, Any]:
    return {
        "id": f"item-{index:06d}",
        "kind": rng.choice(_ITEMS),
        "rarity": rng.choice(_RARITY),
        "qty": rng.randint(1, 99),
        "durability": round(rng.random(), 3),
    }


def player_profile(size: int = 2048, seed: int = 0) -> dict[str, Any]:
    """A player profile whose JSON is about ``size`` bytes (at least ~600)."""
    rng = random.Random(seed)
    profile: dict[str, Any] = {
        "user_id": 10_000_000 + seed,
        "name": f"player_{seed}",
        "level": rng.randint(1, 80),
        "coins": 1000,
        "gems": rng.randint(0, 500),
        "created": "2024-05-01T12:00:00Z",
        "settings": {"music": 0.7, "sfx": 0.9, "language": "en", "hints": True},
        "stats": {"games_played": 0, "wins": rng.randint(0, 300), "best_time": 93.25},
        "quests": {"daily": ["q1", "q7"], "completed": rng.sample(range(200), 8)},
        "inventory": [],
    }
    inventory: list[dict[str, Any]] = profile["inventory"]
    missing = size - json_size(profile)
    while missing > 0:  # add items in batches: one dumps per batch, not per item
        batch = [_item(rng, len(inventory) + i) for i in range(max(1, missing // 120))]
        inventory.extend(batch)
        missing = size - json_size(profile)
    return profile


def bump(document: dict[str, Any]) -> bool:
    """The change every update benchmark makes (the document keeps its size)."""
    document["coins"] += 1
    document["stats"]["games_played"] += 1
    return True


def transfer(documents: dict[str, Any], source: str, target: str, amount: int = 5) -> bool:
    """Move coins between two documents (the ``tx`` benchmark's change)."""
    documents[source]["coins"] -= amount
    documents[target]["coins"] += amount
    return True

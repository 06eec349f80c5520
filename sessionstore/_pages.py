"""Keyset paging: walk a long, ordered listing a page at a time.

Owns :func:`pages`, the one loop behind every listing that may be long
(``Store.keys``, the CLI's keys, locks and audit log): each page is one
statement that starts after the last row of the page before, so memory is
bounded by the page and no cursor or connection is held between pages.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TypeVar

__all__ = ["pages"]

Row = TypeVar("Row")
After = TypeVar("After")


def pages(
    fetch: Callable[[After], list[Row]], last: Callable[[Row], After], start: After, size: int
) -> Iterator[Row]:
    """Rows of ``fetch(after)`` pages (each up to ``size`` rows), until a short page."""
    after = start
    while True:
        found = fetch(after)
        yield from found
        if len(found) < size:
            return
        after = last(found[-1])

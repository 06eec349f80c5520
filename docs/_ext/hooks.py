"""MkDocs hooks for the docs build.

``<!-- sessionstore:configuration-table -->`` in a page becomes the table of
``Store(...)`` options, made by :func:`sessionstore.config.configuration_table`
from :class:`sessionstore.StoreConfig` (the README's table comes from the same
function), so the docs cannot drift from the code.
"""

from __future__ import annotations

from typing import Any

MARKER = "<!-- sessionstore:configuration-table -->"


def on_page_markdown(markdown: str, **kwargs: Any) -> str:
    if MARKER not in markdown:
        return markdown
    from sessionstore.config import configuration_table

    # The README's table escapes the pipes inside its code spans for GitHub;
    # Python-Markdown's tables already ignore pipes inside code spans.
    table = configuration_table().replace("\\|", "|")
    return markdown.replace(MARKER, table)

"""Griffe extension for the docs build: reST roles become Markdown; Store defaults shown.

The library's docstrings cite other objects with Sphinx roles
(``:class:`StoreConfig```, ``:meth:`load```), which Markdown would show
literally. This extension rewrites each role, before mkdocstrings renders
the docstring, into a link to the object's entry in docs/reference.md when
that page documents it, and into inline code otherwise.

``Store.__init__`` takes its defaults from :class:`StoreConfig` through a
private namespace (``lock_timeout: float = _DEFAULT.lock_timeout``), which a
static reading of the signature would show as a bare name; the signature on
the reference page shows the values instead. Both change only the rendered
docs, never the library.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import griffe

# Objects docs/reference.md renders, by the name a docstring uses for them,
# with the anchor mkdocstrings gives them there (their path under `sessionstore`).
_DOCUMENTED = {
    name: f"sessionstore.{name}"
    for name in (
        "Store",
        "StoreConfig",
        "SessionHandle",
        "VersionInfo",
        "MigrationStep",
        "add_fields",
        "transform",
        "FrozenDict",
        "FrozenList",
        "freeze",
        "thaw",
        "SessionStoreError",
        "StoreClosedError",
        "KeyNotLoadedError",
        "LoadInProgressError",
        "LoadCancelledError",
        "SessionClosedError",
        "LockUnavailableError",
        "LockLostError",
        "SchemaValidationError",
        "TransformError",
        "TransactionConflictError",
        "KeysChangedError",
        "MigrationError",
        "VersionNotFoundError",
        "CorruptDataError",
        "StorageUnavailableError",
        "InvalidKeyError",
        "InvalidDataError",
        "InvalidArgumentError",
        "ArgumentTypeError",
        "StoreCloseError",
    )
}
_STORE_METHODS = {
    "session", "load", "get", "is_saved", "update", "update_immutable", "tx",
    "tx_immutable", "save", "unload", "close", "peek", "probe_lock_active",
    "list_versions", "read_version", "restore", "erase", "prune",
}  # fmt: skip

_ROLE = re.compile(r":(?:py:)?(?P<role>[a-z]+):`(?P<body>[^`]+)`")


def _anchor(target: str) -> str | None:
    """The reference page's anchor for a role's target, or None if it is not documented."""
    name = target.removeprefix("sessionstore.")
    for prefix in ("errors.", "migrations.", "frozen.", "store.", "config."):
        name = name.removeprefix(prefix)
    if name in _DOCUMENTED:
        return _DOCUMENTED[name]
    owner, _, member = name.rpartition(".")
    if owner in ("", "Store") and member in _STORE_METHODS:
        return f"sessionstore.Store.{member}"
    return None


def _rewrite(match: re.Match[str]) -> str:
    body = match.group("body")
    explicit = re.fullmatch(r"(?P<text>.+?)\s*<(?P<target>[^>]+)>", body)
    if explicit:
        text, target = explicit.group("text"), explicit.group("target")
    else:
        target = body.lstrip("~")
        # `~a.b.C` shows `C`; a plain `a.b.C` shows itself.
        text = target.rsplit(".", 1)[-1] if body.startswith("~") else target
    if match.group("role") in ("meth", "func"):
        text += "()" if not text.endswith(")") else ""
    anchor = _anchor(target)
    return f"[`{text}`][{anchor}]" if anchor else f"`{text}`"


class RstRoles(griffe.Extension):
    """Rewrite reST roles in every docstring griffe loads."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _ROLE.sub(_rewrite, obj.docstring.value)


def _config_defaults() -> dict[str, Any]:
    from sessionstore.config import StoreConfig

    return {
        option.name: option.default
        for option in dataclasses.fields(StoreConfig)
        if option.default is not dataclasses.MISSING
    }


class StoreDefaults(griffe.Extension):
    """Show the values of ``Store.__init__``'s defaults, taken from StoreConfig."""

    def on_function_instance(self, *, func: griffe.Function, **kwargs: Any) -> None:
        if func.path != "sessionstore.store.Store.__init__":
            return
        defaults = _config_defaults()
        for parameter in func.parameters:
            if str(parameter.default).startswith("_DEFAULT.") and parameter.name in defaults:
                parameter.default = repr(defaults[parameter.name])

"""Named migration steps and how they are applied on load.

Owns the step types users build (:func:`add_fields`, :func:`transform`),
the check that a store's steps are well formed, and :func:`apply`, which
brings loaded data forward by the steps it has not seen. Each document stores
the names of the steps already applied to it; a stored name this code does
not know means a newer deploy wrote the data, and the load fails rather than
guess (Lyra's rule).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import ArgumentTypeError, InvalidArgumentError, MigrationError
from .frozen import freeze, thaw

__all__ = ["MigrationStep", "add_fields", "apply", "check_steps", "pending", "transform"]


@dataclass(frozen=True)
class MigrationStep:
    """One named, ordered step that changes stored data from one shape to the next.

    ``apply`` receives a plain mutable copy of the data and returns the new data.
    """

    name: str
    apply: Callable[[Any], Any]


def add_fields(name: str, fields: dict[str, Any]) -> MigrationStep:
    """A step that adds ``fields`` (deep-copied) to a dict document, keeping existing values."""
    if not isinstance(name, str):
        raise ArgumentTypeError(f"a migration step name must be a str, not {type(name).__name__}")
    if not isinstance(fields, dict):
        raise ArgumentTypeError("add_fields() needs a dict of field defaults")
    defaults = freeze(fields)

    def add(data: Any) -> Any:
        if not isinstance(data, dict):
            raise TypeError(
                f"add_fields step {name!r} needs a dict document, got {type(data).__name__}"
            )
        for field, value in defaults.items():
            if field not in data:
                data[field] = thaw(value)
        return data

    return MigrationStep(name, add)


def transform(name: str, fn: Callable[[Any], Any]) -> MigrationStep:
    """A step that replaces the data with ``fn(data)``.

    ``fn`` gets a plain mutable copy; it returns the new data, or changes the
    copy in place and returns ``None`` (the changed copy is then the new data).
    """
    if not isinstance(name, str):
        raise ArgumentTypeError(f"a migration step name must be a str, not {type(name).__name__}")
    if not callable(fn):
        raise ArgumentTypeError("transform() needs a callable")

    def run(data: Any) -> Any:
        result = fn(data)
        return data if result is None else result

    return MigrationStep(name, run)


def check_steps(steps: Iterable[MigrationStep]) -> tuple[MigrationStep, ...]:
    """Validate a store's steps: right type, non-empty unique names."""
    checked = tuple(steps)
    seen: set[str] = set()
    for step in checked:
        if not isinstance(step, MigrationStep):
            raise ArgumentTypeError(
                "migrations must be built with add_fields() or transform(), "
                f"got {type(step).__name__}"
            )
        if not isinstance(step.name, str) or not step.name:
            raise InvalidArgumentError("a migration step needs a non-empty str name")
        if step.name in seen:
            raise InvalidArgumentError(f"migration step name {step.name!r} is used twice")
        seen.add(step.name)
    return checked


def pending(
    steps: Sequence[MigrationStep], applied: Sequence[str], context: str
) -> list[MigrationStep]:
    """The steps not yet applied, in order; :class:`MigrationError` for unknown applied names."""
    known = {step.name for step in steps}
    unknown = [name for name in applied if name not in known]
    if unknown:
        raise MigrationError(
            f"{context}: stored data has migrations this code does not know: {unknown}; "
            "it was written by a newer deploy"
        )
    done = set(applied)
    return [step for step in steps if step.name not in done]


def apply(
    steps: Sequence[MigrationStep], data: Any, applied: Sequence[str], context: str
) -> tuple[Any, list[str], bool]:
    """Run the steps of ``steps`` not named in ``applied``, in order.

    Returns ``(data, applied names, whether any step ran)``. ``data`` must be a
    plain mutable value (steps may change it in place). Raises
    :class:`MigrationError` if a step raises or ``applied`` names a step this
    code does not know.
    """
    names = list(applied)
    ran = False
    for step in pending(steps, applied, context):
        try:
            data = step.apply(data)
        except Exception as exc:
            raise MigrationError(f"{context}: migration {step.name!r} raised {exc!r}") from exc
        names.append(step.name)
        ran = True
    return data, names, ran

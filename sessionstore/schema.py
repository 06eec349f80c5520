"""Schema adapters: one ``Validator`` for every kind of schema a Store accepts.

Owns turning the ``schema=`` argument into a callable that raises
:class:`SchemaValidationError` with a readable reason. Accepted forms:

* ``None``: everything JSON is valid;
* a callable ``(data) -> bool | (bool, str) | None``; ``None`` means valid,
  raising means invalid (the exception is chained);
* a pydantic model class (``BaseModel`` subclass) or a ``TypeAdapter``;
* a JSON Schema ``dict`` (needs the ``jsonschema`` extra).

pydantic and jsonschema are imported only when such a schema is given.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .errors import SchemaValidationError

__all__ = ["SchemaLike", "Validator", "accept_any", "make_validator"]

SchemaLike = Any
"""What ``Store(schema=...)`` accepts; see the module docstring."""

Validator = Callable[[Any, str], None]
"""``validator(data, context)`` raises :class:`SchemaValidationError` or returns None."""


def accept_any(data: Any, context: str) -> None:
    """The validator of a store without a schema."""
    return None


def _from_callable(check: Callable[[Any], Any]) -> Validator:
    def validate(data: Any, context: str) -> None:
        try:
            verdict = check(data)
        except SchemaValidationError:
            raise
        except Exception as exc:
            raise SchemaValidationError(f"{context}: schema check raised {exc!r}") from exc
        if verdict is None or verdict is True:
            return
        if verdict is False:
            raise SchemaValidationError(f"{context}: schema check failed")
        if isinstance(verdict, tuple) and len(verdict) == 2 and isinstance(verdict[0], bool):
            ok, reason = verdict
            if ok:
                return
            raise SchemaValidationError(f"{context}: {reason}")
        raise SchemaValidationError(
            f"{context}: schema check returned {verdict!r}; expected bool, (bool, str) or None"
        )

    return validate


def _from_pydantic(schema: Any) -> Validator | None:
    try:
        import pydantic
    except ImportError:  # pragma: no cover - only without the extra
        return None
    if isinstance(schema, type) and issubclass(schema, pydantic.BaseModel):
        check: Callable[[Any], Any] = schema.model_validate
    elif isinstance(schema, pydantic.TypeAdapter):
        check = schema.validate_python
    else:
        return None

    def validate(data: Any, context: str) -> None:
        try:
            check(data)
        except pydantic.ValidationError as exc:
            raise SchemaValidationError(f"{context}: {exc}") from exc

    return validate


def _from_json_schema(schema: dict[str, Any]) -> Validator:
    try:
        import jsonschema
    except ImportError as exc:
        raise TypeError(
            "a JSON Schema dict needs the jsonschema package: "
            "pip install 'sessionstore[jsonschema]'"
        ) from exc
    validator_class = jsonschema.validators.validator_for(
        schema, default=jsonschema.Draft202012Validator
    )
    try:
        validator_class.check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise TypeError(f"schema is not a valid JSON Schema: {exc.message}") from exc
    checker = validator_class(schema)

    def validate(data: Any, context: str) -> None:
        error = jsonschema.exceptions.best_match(checker.iter_errors(data))
        if error is not None:
            where = "/".join(str(part) for part in error.absolute_path) or "$"
            raise SchemaValidationError(f"{context}: at {where}: {error.message}")

    return validate


def make_validator(schema: SchemaLike) -> Validator:
    """Return the validator for ``schema`` (see the module docstring for the forms)."""
    if schema is None:
        return accept_any
    if isinstance(schema, dict):
        return _from_json_schema(schema)
    adapted = _from_pydantic(schema)
    if adapted is not None:
        return adapted
    if callable(schema):
        return _from_callable(schema)
    raise TypeError(
        f"schema must be None, a callable, a pydantic model or TypeAdapter, or a JSON Schema "
        f"dict; got {type(schema).__name__}"
    )

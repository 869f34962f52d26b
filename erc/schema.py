"""Params checked against a schema (a dataclass's or pydantic model's own types), one line per problem.

Every problem reads `<file>: <dotted key>: <what is wrong>`, the style of every erc input error.
"""

from __future__ import annotations

from pydantic import TypeAdapter, ValidationError

from erc.errors import ErcDataError

_PLAIN = {  # pydantic's wording where a shorter one says the same
    "extra_forbidden": "unknown key",
    "missing": "missing",
}


_BOUNDS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal"}  # a value outside a field's range


def problem_of(error: dict) -> str:
    """One pydantic error as `what is wrong (got <value>)`."""
    if error["type"] in _PLAIN:
        return _PLAIN[error["type"]]
    return f"{_message(error)} (got {error['input']!r})"


def _message(error: dict) -> str:
    return error["msg"][0].lower() + error["msg"][1:]


def key_of(error: dict, prefix: str = "") -> str:
    # pydantic adds the union member it tried ("str", "list[str]") to the location: not a key of the params
    loc = [str(part) for part in error["loc"] if not (isinstance(part, str) and ("[" in part or part in
                                                                                  ("str", "int", "float", "bool")))]
    return ".".join(p for p in [prefix, *loc] if p)


def check(schema, value, *, source, prefix: str = ""):
    """`value` validated (and converted) by `schema`'s types; else ErcDataError `<source>: <prefix.key>: <problem>`."""
    try:
        return TypeAdapter(schema).validate_python(value)
    except ValidationError as e:
        first = e.errors()[0]
        raise ErcDataError(source, f"{key_of(first, prefix)}: {problem_of(first)}") from None


def field_problem(schema, name: str, value) -> str | None:
    """What is wrong with `value` as field `name` of the pydantic model `schema` (a config's own schema), or None:
    `1.5 outside [0, 1)` for a value outside the field's range, else `<value>: <pydantic's words>`."""
    try:
        TypeAdapter(schema).validate_python({name: value})
        return None
    except ValidationError as e:
        error = e.errors()[0]
    if error["type"] in _BOUNDS:
        return f"{value!r} outside {interval(schema.model_fields[name].metadata)}"
    return f"{value!r}: {_message(error)}"


def interval(constraints) -> str:
    """A field's range constraints (annotated_types' Ge, Gt, Le, Lt) as an interval: `[0, 1)`, `(0, inf)`."""
    bound = {kind: getattr(c, kind) for c in constraints for kind in ("ge", "gt", "le", "lt") if hasattr(c, kind)}
    low = f"[{bound['ge']}" if "ge" in bound else f"({bound.get('gt', '-inf')}"
    high = f"{bound['le']}]" if "le" in bound else f"{bound.get('lt', 'inf')})"
    return f"{low}, {high}"

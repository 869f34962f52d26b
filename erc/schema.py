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


def problem_of(error: dict) -> str:
    """One pydantic error as `what is wrong (got <value>)`."""
    if error["type"] in _PLAIN:
        return _PLAIN[error["type"]]
    message = error["msg"]
    message = message[0].lower() + message[1:]
    return f"{message} (got {error['input']!r})"


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

"""params.yaml, read once per stage program."""

from __future__ import annotations

import atexit
import functools
import os
import sys
import threading
from pathlib import Path

import yaml

from erc.errors import ErcDataError


def load_params(path="params.yaml", overrides=()) -> dict:
    """params.yaml, with `overrides` applied: `dotted.key=value` strings, values read as YAML (as `dvc exp run -S`).

    An override keeps the shape params.yaml gives the key: a section is replaced by a section (`{}` empties it),
    a list by a list; a plain value by anything (its section's schema checks it)."""
    try:
        with open(path) as f:
            params = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ErcDataError(path, f"unreadable params ({str(e).splitlines()[0]})") from None
    for override in overrides:
        apply_override(params, override, source=path)
    return params


SHAPES = ((dict, "a section"), (list, "a list"))


def shape_of(value) -> str:
    return next((name for kind, name in SHAPES if isinstance(value, kind)), "a value")


def apply_override(params: dict, override: str, *, source="params.yaml") -> None:
    """Set one `dotted.key=value` in `params`; a bad one is an ErcDataError naming the key."""
    key, sep, text = override.partition("=")
    key = key.strip()
    parts = key.split(".")
    if not sep or not all(parts):
        raise ErcDataError(source, f"--set {override!r}: not key=value (e.g. --set train.epochs=10)")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as e:
        what = "; ".join(filter(None, (getattr(e, "context", None), getattr(e, "problem", None))))
        raise ErcDataError(source, f"--set {key}: {text!r} is not a YAML value ({what or str(e).splitlines()[0]}); "
                                   "quote the whole value to pass it as text") from None
    if parts[0] not in params:  # a misspelt section would be ignored: the run would silently differ
        raise ErcDataError(source, f"--set {key}: no {parts[0]!r} in params (its top-level keys: {', '.join(params)})")
    node, i = params, 0
    # A section whose keys hold dots (tune.space.<model>: `train.lr`) takes the rest of the key whole.
    while i < len(parts) - 1 and ".".join(parts[i:]) not in node and not any("." in str(k) for k in node):
        name, done = parts[i], ".".join(parts[:i + 1])
        child = node.get(name)
        if child is None:
            child = {}
        elif not isinstance(child, dict):
            raise ErcDataError(source, f"--set {key}: {done} is {shape_of(child)} ({child!r}), not a section")
        # No copy: a section that YAML anchors share (`mmolre_context: *mmolre`, "the same widths") changes for
        # every name of it, as `dvc exp run -S` changes it in params.yaml.
        node[name] = node = child
        i += 1
    leaf = ".".join(parts[i:])
    if leaf in node and shape_of(node[leaf]) != "a value" and shape_of(value) != shape_of(node[leaf]):
        old = node[leaf]
        if isinstance(old, dict):
            example = f"; set one of its keys, e.g. --set {key}.{next(iter(old))}=..." if old else ""
        else:
            example = f"; e.g. --set '{key}=[{', '.join(map(str, old[:2]))}]'"
        raise ErcDataError(source, f"--set {key}: params hold {shape_of(old)} here, not {shape_of(value)} "
                                   f"({value!r}){example}")
    node[leaf] = value


def stage_main(fn):
    """Run a stage's main(); bad input ends it with one line on stderr and exit status 1. A stage run as a program
    that returns exits at once (`exit_without_teardown`); one called from Python (a test) returns as usual."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        # MLflow draws a progress bar per artifact download: the leaderboard and report stages read one file per
        # run, and 75 runs' bars buried their own output.
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        try:
            result = fn(*args, **kwargs)
        except ErcDataError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(1)
        if fn.__module__ == "__main__":
            exit_without_teardown(0)
        return result

    return wrapper


def exit_without_teardown(status: int) -> None:
    """End the process as Python would, less its last step: threads are joined and every atexit handler runs (Ray's
    shutdown, log handlers' flush, MLflow's), but the interpreter does not then free each of its thousands of
    modules and objects one by one (torch, Ray, MLflow: about 2 s of a 10 s train command on 2 cores)."""
    threading._shutdown()  # what Python's exit does first: the executors' exit hooks, then non-daemon threads
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def project_root() -> Path:
    return Path(__file__).resolve().parent.parent

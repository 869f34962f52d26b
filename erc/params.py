"""params.yaml, read once per stage program."""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import yaml

from erc.errors import ErcDataError


def load_params(path="params.yaml", overrides=()) -> dict:
    """params.yaml, with `overrides` applied: `dotted.key=value` strings, values read as YAML (as `dvc exp run -S`)."""
    try:
        with open(path) as f:
            params = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ErcDataError(path, f"unreadable params ({str(e).splitlines()[0]})") from None
    for override in overrides:
        key, sep, value = override.partition("=")
        if not sep or not key:
            raise ErcDataError(path, f"override {override!r} is not key=value")
        *parents, leaf = key.split(".")
        node = params
        for name in parents:
            node = node.setdefault(name, {})
            if not isinstance(node, dict):
                raise ErcDataError(path, f"override {override!r}: {name} is not a section")
        node[leaf] = yaml.safe_load(value)
    return params


def stage_main(fn):
    """Run a stage's main(); bad input ends it with one line on stderr and exit status 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        # MLflow draws a progress bar per artifact download: the leaderboard and report stages read one file per
        # run, and 75 runs' bars buried their own output.
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        try:
            return fn(*args, **kwargs)
        except ErcDataError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(1)

    return wrapper


def project_root() -> Path:
    return Path(__file__).resolve().parent.parent

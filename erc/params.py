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

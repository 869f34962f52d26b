"""params.yaml, read once per stage program."""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import yaml

from erc.errors import ErcDataError


def load_params(path="params.yaml") -> dict:
    try:
        with open(path) as f:
            return yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ErcDataError(path, f"unreadable params ({str(e).splitlines()[0]})") from None


def stage_main(fn):
    """Run a stage's main(); bad input ends it with one line on stderr and exit status 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ErcDataError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(1)

    return wrapper


def project_root() -> Path:
    return Path(__file__).resolve().parent.parent

"""Readers for the upstream files that fail with one line naming the file."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd

from erc.data.canonical import check_features
from erc.errors import ErcDataError


def read_csv(path, *, columns: list[str] | None = None, **kwargs) -> pd.DataFrame:
    """Read a CSV; with `columns`, every one of them must be there."""
    try:
        df = pd.read_csv(path, **kwargs)
    except (OSError, ValueError, pd.errors.ParserError, UnicodeDecodeError) as e:
        raise ErcDataError(path, f"unreadable CSV ({str(e).splitlines()[0]})") from None
    if columns is not None:
        missing = [c for c in columns if c not in df.columns]
        if missing:
            raise ErcDataError(path, f"missing column(s) {missing}; has {list(df.columns)}")
    return df


def read_matrix_csv(path, *, columns: int) -> np.ndarray:
    """A headerless all-numeric CSV with exactly `columns` columns, checked for NaN/inf."""
    df = read_csv(path, header=None)
    if df.shape[1] != columns:
        raise ErcDataError(path, f"{df.shape[1]} columns, expected {columns}")
    try:
        values = df.to_numpy(dtype=np.float64)
    except ValueError as e:
        raise ErcDataError(path, f"non-numeric value ({e})") from None
    return check_features(values, source=path)


def read_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise ErcDataError(path, f"unreadable JSON ({e})") from None


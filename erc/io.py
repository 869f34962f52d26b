"""Writes that never leave a half-written output behind: write beside the target, then rename."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from erc.errors import ErcDataError


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike):
    """Yield a temporary path next to `target`; on success rename it onto `target`, else delete it.

    Works for files and for directories (the caller creates what it wants at the yielded path).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent)) / target.name
    try:
        yield tmp
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp.parent, ignore_errors=True)


def write_json(path, obj) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_text(path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_npy(path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, array)


def check_writable(path, *, folder: bool = False) -> None:
    """ErcDataError unless `path` can be written: a file (or, `folder`, a folder the caller fills), its parent
    existing or creatable, and writable. Called at a program's start for each output, so that a bad `--out` is
    found before a long run rather than after it; it creates nothing."""
    path = Path(path)
    if path.is_dir() and not folder:
        raise ErcDataError(path, "is a folder: give a file path")
    if path.exists() and not path.is_dir() and folder:
        raise ErcDataError(path, "is a file: a folder is written here")
    parent = path.absolute().parent
    while not parent.exists() and not parent.is_symlink():  # the nearest existing folder; atomic_path creates the rest
        parent = parent.parent
    if not parent.is_dir():
        raise ErcDataError(path, f"cannot be created: {parent} is not a folder")
    try:  # permissions, ACLs, a read-only mount, root: only a write says it all
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as e:
        raise ErcDataError(path, f"cannot write in {parent} ({e.strerror or e})") from None


@contextlib.contextmanager
def locked_atomic_path(target: str | os.PathLike):
    """`atomic_path` for a long stage, whose process may be killed outright (kill -9, a lost node): nothing of
    atomic_path's clean-up runs then. The temporary folder is locked (flock) until the rename is done, so that the
    next run's `remove_stale_temps` tells a dead process's folder from a live one's; the kernel drops the lock of a
    dead process."""
    fd = None
    try:
        with atomic_path(target) as tmp:
            fd = os.open(tmp.parent, os.O_RDONLY | os.O_DIRECTORY)
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield tmp
    finally:
        if fd is not None:
            os.close(fd)


def remove_stale_temps(target: str | os.PathLike, *, grace_s: float = 5.0) -> list[Path]:
    """Remove the temporary folders that `locked_atomic_path` made beside `target` and no live process holds;
    the removed ones back. A folder younger than `grace_s` is kept: its maker may not have locked it yet."""
    target = Path(target)
    made = re.compile(rf"\.{re.escape(target.name)}\.[a-z0-9_]{{8}}")  # tempfile.mkdtemp's names, as atomic_path asks
    removed = []
    candidates = target.parent.iterdir() if target.parent.is_dir() else []
    for folder in sorted(candidates):
        if not made.fullmatch(folder.name) or folder.is_symlink() or not folder.is_dir():
            continue
        try:
            fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            continue  # gone meanwhile (its maker finished), or not ours to read
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if time.time() - os.fstat(fd).st_mtime > grace_s:
                shutil.rmtree(folder, ignore_errors=True)
                removed += [folder] if not folder.exists() else []
        except BlockingIOError:
            pass  # a live run's
        finally:
            os.close(fd)
    return removed

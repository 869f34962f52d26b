"""Where the public files come from: a mirror directory if one is given, else their public URL.

Every file is named by its URL and pinned by its sha256. A URL
`https://raw.githubusercontent.com/<owner>/<repo>/<commit>/<path>` maps onto a mirror as
`<mirror>/<owner>/<repo>/<commit>/<path>`; the mirror is read first (env `ERC_DATA_MIRROR`).
Downloads land in a local cache under the same layout, so they happen once.
"""

from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from erc.errors import ErcDataError
from erc.io import atomic_path

RAW_PREFIX = "https://raw.githubusercontent.com/"
DEFAULT_CACHE = Path("data/raw")


@dataclass(frozen=True)
class FileSpec:
    url: str
    sha256: str

    @property
    def relpath(self) -> str:
        if not self.url.startswith(RAW_PREFIX):
            raise ErcDataError(self.url, f"URL must start with {RAW_PREFIX}")
        return self.url[len(RAW_PREFIX):]


def sha256_of(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tree_sha256(file_hashes: dict[str, str]) -> str:
    """One checksum for many files: sha256 of `<sha256>  <relative path>` lines, sorted by path."""
    lines = "".join(f"{file_hashes[p]}  {p}\n" for p in sorted(file_hashes))
    return hashlib.sha256(lines.encode()).hexdigest()


def mirror_dir() -> Path | None:
    mirror = os.environ.get("ERC_DATA_MIRROR")
    return Path(mirror) if mirror else None


def _locate(url_relpath: str, cache: Path) -> Path:
    """The local copy of a file: mirror first, then cache, else download into the cache."""
    mirror = mirror_dir()
    if mirror is not None:
        candidate = mirror / url_relpath
        if candidate.is_file():
            return candidate
    cached = cache / url_relpath
    if cached.is_file():
        return cached
    url = RAW_PREFIX + url_relpath
    where = f"not in mirror {mirror} and " if mirror is not None else ""
    try:
        with atomic_path(cached) as tmp, urllib.request.urlopen(url, timeout=60) as response:
            tmp.write_bytes(response.read())
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", None) or e
        raise ErcDataError(url, f"missing file: {where}download failed ({reason})") from None
    return cached


def fetch(spec: FileSpec, cache: Path = DEFAULT_CACHE) -> Path:
    """Return a local path to the file `spec` names, after checking its sha256."""
    path = _locate(spec.relpath, cache)
    actual = sha256_of(path)
    if actual != spec.sha256:
        raise ErcDataError(path, f"checksum mismatch: sha256 {actual}, expected {spec.sha256} ({spec.url})")
    return path


def fetch_tree(url: str, tree_hash: str, relpaths: list[str], cache: Path = DEFAULT_CACHE) -> dict[str, Path]:
    """Fetch many files under one URL prefix, checked together against `tree_sha256`.

    Returns `{relative path: local path}`.
    """
    if not relpaths:
        raise ErcDataError(url, "no files listed")
    base = FileSpec(url.rstrip("/"), "").relpath
    paths = {rel: _locate(f"{base}/{rel}", cache) for rel in relpaths}
    actual = tree_sha256({rel: sha256_of(p) for rel, p in paths.items()})
    if actual != tree_hash:
        raise ErcDataError(url, f"checksum mismatch over {len(relpaths)} files: tree sha256 {actual}, expected {tree_hash}")
    return paths


def file_specs(entries: dict) -> dict[str, FileSpec]:
    """Params `{name: {url, sha256}}` -> `{name: FileSpec}`."""
    return {name: FileSpec(e["url"], e["sha256"]) for name, e in entries.items() if "sha256" in e}


def local_file(path, expected_sha256: str | None) -> Path:
    """A file of one's own (`{path, sha256}` in params), checked like a downloaded one."""
    path = Path(path)
    if not path.is_file():
        raise ErcDataError(path, "missing file (a files entry's `path` is read from the working directory)")
    actual = sha256_of(path)
    if not expected_sha256:
        raise ErcDataError(path, f"no sha256 in its files entry: add `sha256: {actual}` (so that a changed file "
                                 "is noticed and reruns the pipeline)")
    if actual != expected_sha256:
        raise ErcDataError(path, f"checksum mismatch: sha256 {actual}, expected {expected_sha256}")
    return path


class DatasetFiles:
    """A dataset's `files:` params entry, fetched on demand by name.

    An entry is `{url, sha256}` (one public file), `{url, tree_sha256}` (a folder whose file list the
    adapter knows, checked as a whole) or `{path, sha256}` (a local file of one's own).
    """

    def __init__(self, entries: dict, cache: Path = DEFAULT_CACHE):
        self.entries = entries
        self.cache = Path(cache)

    def path(self, name: str) -> Path:
        e = self._entry(name)
        if "path" in e:
            return local_file(e["path"], e.get("sha256"))
        if not isinstance(e.get("url"), str) or not isinstance(e.get("sha256"), str):
            raise ErcDataError("files", f"{name}: an entry is {{url, sha256}} or {{path, sha256}}, got {e!r}")
        return fetch(FileSpec(e["url"], e["sha256"]), self.cache)

    def tree(self, name: str, relpaths: list[str]) -> dict[str, Path]:
        e = self._entry(name)
        return fetch_tree(e["url"], e["tree_sha256"], relpaths, self.cache)

    def checksums(self) -> dict:
        return {name: {k: v for k, v in e.items() if k in ("url", "path", "sha256", "tree_sha256")}
                for name, e in self.entries.items()}

    def _entry(self, name: str) -> dict:
        if name not in self.entries:
            raise ErcDataError("params.yaml", f"dataset files lack an entry {name!r}")
        return self.entries[name]

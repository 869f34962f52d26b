"""Dataset adapters: each turns a dataset's files into the canonical form.

`conversations` is the generic one (any corpus of dialogues, configured in params: docs/datasets.md); `mosi` and
`iemocap` stay separate because their formats are truly special (MOSI's HDF5 labels and feature matrices,
IEMOCAP's JSON tree and the COSMIC cross-check).
"""

from __future__ import annotations

from erc.data import conversations, iemocap, mosi
from erc.data.canonical import Prepared
from erc.errors import ErcDataError
from erc.sources import DEFAULT_CACHE, DatasetFiles

ADAPTERS = {"conversations": conversations.build, "mosi": mosi.build, "iemocap": iemocap.build}
PARAMS_PARTS = ("options", "files")  # an adapter's error about its params entry names one of these, not a file


def build_dataset(params: dict, name: str, *, source="params.yaml", cache=DEFAULT_CACHE) -> tuple[Prepared, list[str]]:
    """The dataset `datasets.<name>` of params, built by its adapter: (prepared, every dialogue id it must hold).

    A problem with the entry itself reads `<params file>: datasets.<name>.<key>: <problem>`; a problem with the
    data names the data file."""
    entries = params.get("datasets") or {}
    if name not in entries:
        raise ErcDataError(source, f"datasets.{name}: no such entry (there are {sorted(entries)})")
    entry = entries[name] or {}
    adapter = entry.get("adapter")
    if adapter not in ADAPTERS:
        raise ErcDataError(source, f"datasets.{name}.adapter: {adapter!r} is none of {sorted(ADAPTERS)}")
    try:
        prepared, dialogues = ADAPTERS[adapter](DatasetFiles(entry.get("files") or {}, cache), entry.get("options") or {})
    except ErcDataError as e:
        if e.path in PARAMS_PARTS:
            raise ErcDataError(source, f"datasets.{name}.{e.path}.{e.problem}") from None
        raise
    prepared.meta["dataset"] = name
    return prepared, dialogues

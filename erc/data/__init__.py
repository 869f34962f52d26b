"""Dataset adapters: each turns a dataset's files into the canonical form.

`conversations` is the generic one (any corpus of dialogues, configured in params: docs/datasets.md); `mosi` and
`iemocap` stay separate because their formats are truly special (MOSI's HDF5 labels and feature matrices,
IEMOCAP's JSON tree and the COSMIC cross-check).
"""

from __future__ import annotations

from erc.data import conversations, csd, folder_labels, iemocap, mosi, voiceerc
from erc.data.canonical import Prepared, split_problem
from erc.errors import ErcDataError
from erc.sources import DEFAULT_CACHE, DatasetFiles

ADAPTERS = {"conversations": conversations.build, "mosi": mosi.build, "iemocap": iemocap.build,
            "folder_labels": folder_labels.build, "csd": csd.build}
# Published per-utterance feature sets that sit beside a corpus (`datasets.<name>.feature_files`), by reader.
FEATURE_READERS = {"voiceerc_meld": voiceerc.meld_prosody}
PARAMS_PARTS = ("options", "files")  # an adapter's error about its params entry names one of these, not a file
# The options that decide an adapter's splits: what to change besides the data when a split comes out empty or
# without a label (the note in meta.json gives the values used).
SPLIT_OPTIONS = {
    "conversations": "without a valid file, options.valid_from_train.fraction of the training dialogues become "
                     "validation, chosen by options.valid_from_train.seed",
    "mosi": "options.valid_fraction of the training videos become validation, chosen by options.valid_seed",
    "folder_labels": "options.valid_fraction and test_fraction of the speakers (3 at least) go to valid and test, "
                     "chosen by options.split_seed",
    "csd": "the folds (files.folds, the SDK's *_std_folds.py, or options.folds) deal the videos to the splits",
}


def build_dataset(params: dict, name: str, *, source="params.yaml", cache=DEFAULT_CACHE) -> tuple[Prepared, list[str]]:
    """The dataset `datasets.<name>` of params, built by its adapter: (prepared, every dialogue id it must hold).

    A problem with the entry itself reads `<params file>: datasets.<name>.<key>: <problem>`; a problem with the
    data names the data file; splits that cannot be trained on (`canonical.split_problem`) read
    `<params file>: datasets.<name>: <problem>: <what to change>`."""
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
    for set_name, spec in (entry.get("feature_files") or {}).items():
        if not isinstance(spec, dict) or spec.get("reader") not in FEATURE_READERS or not spec.get("files"):
            raise ErcDataError(source, f"datasets.{name}.feature_files.{set_name}: needs reader (one of "
                                       f"{sorted(FEATURE_READERS)}) and files")
        extra = DatasetFiles(spec["files"], cache)
        prepared.features[set_name] = FEATURE_READERS[spec["reader"]](prepared.table, extra)
        prepared.meta.setdefault("sources", {}).update(extra.checksums())
    problem = split_problem(prepared.table, prepared.meta["target"])
    if problem:
        options = f", or change the split ({SPLIT_OPTIONS[adapter]})" if adapter in SPLIT_OPTIONS else ""
        raise ErcDataError(source, f"datasets.{name}: {problem}: add dialogues to the corpus{options}")
    prepared.meta["dataset"] = name
    return prepared, dialogues

"""Speech-emotion corpora laid out one folder per label (`Angry/x.wav`, `Happy/y.wav`, ...), or with the label
in the file name: each clip becomes its own one-utterance dialogue.

Params (`datasets.<name>`): `files.clips` names the folder (`{url, tree_sha256}` in the mirror, or a local
`{path}`); options:

- `pattern`: a regular expression searched in the file's path relative to the folder; its named groups
  `speaker` and `label` (when `label_from: pattern`) are used. Without a `speaker` group every clip is its
  own speaker.
- `label_from`: `folder` (the first folder of the relative path; default) or `pattern`.
- `labels`: the label set in id order, as `{name: [aliases...]}` or a list of names; a clip whose label is not
  in it is an error naming the clip. Default: the sorted names found, lower-cased.
- `valid_fraction`, `test_fraction`, `split_seed`: speakers (not clips) are dealt to valid/test by
  `sha256("<split_seed>:<speaker>")`, so the split is speaker-independent and deterministic.

The utterance id is the clip's relative path: `erc.data.media`'s `folder` layout finds the file from it.
"""

from __future__ import annotations

import hashlib
import re

import numpy as np

from erc.data.canonical import Prepared, make_table
from erc.data.media import AUDIO_SUFFIXES, VIDEO_SUFFIXES
from erc.errors import ErcDataError
from erc.sources import DatasetFiles


def label_index(labels) -> dict[str, int]:
    """`{alias or name (lower-case): id}` from a list of names or `{name: [aliases]}`."""
    if isinstance(labels, dict):
        return {alias.lower(): i for i, (name, aliases) in enumerate(labels.items()) for alias in [name, *aliases]}
    return {name.lower(): i for i, name in enumerate(labels)}


def speaker_split(speakers, *, valid_fraction: float, test_fraction: float, seed: int) -> dict[str, str]:
    """Deal whole speakers to train/valid/test by a hash rank; each split gets at least one when it can."""
    unique = sorted(set(speakers), key=lambda s: hashlib.sha256(f"{seed}:{s}".encode()).hexdigest())
    n_test = max(1, round(test_fraction * len(unique))) if test_fraction > 0 and len(unique) >= 3 else 0
    n_valid = max(1, round(valid_fraction * len(unique))) if valid_fraction > 0 and len(unique) >= 3 else 0
    return {s: "test" if i < n_test else "valid" if i < n_test + n_valid else "train" for i, s in enumerate(unique)}


def build(files: DatasetFiles, options: dict) -> tuple[Prepared, list[str]]:
    root, relpaths = files.folder("clips", suffixes=options.get("suffixes", sorted(AUDIO_SUFFIXES | VIDEO_SUFFIXES)))
    pattern = re.compile(options["pattern"]) if options.get("pattern") else None
    label_from = options.get("label_from", "folder")
    if label_from not in ("folder", "pattern"):
        raise ErcDataError("params.yaml", f"label_from must be folder or pattern, not {label_from!r}")
    rows = []
    for rel in relpaths:
        match = pattern.search(rel) if pattern else None
        if pattern and match is None:
            raise ErcDataError(root / rel, f"file name does not match the pattern {pattern.pattern!r}")
        groups = match.groupdict() if match else {}
        if label_from == "folder":
            if "/" not in rel:
                raise ErcDataError(root / rel, "not inside a label folder")
            label = rel.split("/")[0]
        else:
            label = groups.get("label")
            if label is None:
                raise ErcDataError("params.yaml", "label_from: pattern needs a (?P<label>...) group")
        rows.append({"utterance_id": rel, "label": label, "speaker": groups.get("speaker") or rel})
    found = sorted({r["label"] for r in rows})
    index = label_index(options.get("labels") or [name.lower() for name in found])
    names = list(options["labels"]) if isinstance(options.get("labels"), dict) else \
        [n.lower() for n in (options.get("labels") or found)]
    for r in rows:
        if r["label"].lower() not in index:
            raise ErcDataError(root / r["utterance_id"], f"label {r['label']!r} is not in the label set {names}")
        r["emotion_id"] = index[r["label"].lower()]
    split_of = speaker_split([r["speaker"] for r in rows], valid_fraction=float(options.get("valid_fraction", 0.15)),
                             test_fraction=float(options.get("test_fraction", 0.15)), seed=int(options.get("split_seed", 0)))
    records = [{"dialogue_id": r["utterance_id"], "turn": 0, "utterance_id": r["utterance_id"], "speaker": r["speaker"],
                "split": split_of[r["speaker"]], "emotion_id": r["emotion_id"], "emotion": names[r["emotion_id"]]}
               for r in rows]
    table = make_table(records)
    meta = {
        "dataset": options.get("name", "folder"),
        "target": "emotion",
        "emotion_labels": names,
        "sentiment_labels": [],
        "has_sentiment_score": False,
        "sources": files.checksums(),
        "media": {"layout": "folder", "files": "clips"},
        "speakers": int(len(set(split_of))),
        "notes": ["one clip = one one-utterance dialogue (utterance id = the clip's path in the folder)",
                  f"labels from the {label_from}; speakers dealt to splits by hash (speaker-independent)"],
    }
    return Prepared(table, meta, {}), list(np.asarray(table["dialogue_id"]))

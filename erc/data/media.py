"""Raw-media layouts: where each utterance's audio (or video) is, for a prepared dataset.

`featurize.media.<dataset>` in params.yaml names a layout and its root; `media_items` returns one
`MediaItem` (a file, optionally a segment of it) per row of the prepared table:

- `table`: a CSV with columns `utterance_id` and `media` (a path relative to `root`, or absolute), and
  optionally `start` and `end` in seconds (a segment of a longer recording);
- `folder`: the folder-per-label layout (`erc.data.folder_labels`): the utterance id is the clip's path
  relative to the dataset's `files.<files>` folder;
- `iemocap_release`: IEMOCAP's release (`IEMOCAP_full_release/Session{1-5}/...`): `sentences/wav/<dialog>/<utt>.wav`,
  or, where that file is absent, the segment of `dialog/wav/<dialog>.wav` given by `dialog/EmoEvaluation/<dialog>.txt`;
- `meld_release`: MELD's release (`MELD.Raw`): `train_splits/dia<D>_utt<U>.mp4`, `dev_splits_complete/...`,
  `output_repeated_splits_test/...` (found directly under `root` or one folder down), for erc's MELD ids
  `<split>_dia<D>_utt<U>`.

A row with no file is still returned (the path it should have): reading it gives the one-line "missing media
file" error, or the counted fallback of `featurize.on_bad_media: mask`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from erc.data.readers import read_csv
from erc.errors import ErcDataError
from erc.sources import DatasetFiles

AUDIO_SUFFIXES = {".wav", ".flac", ".ogg", ".mp3", ".aiff", ".aif"}  # read by libsndfile; the rest by ffmpeg
VIDEO_SUFFIXES = {".mp4", ".m4a", ".webm", ".mkv", ".avi", ".mov"}
MELD_DIRS = {"train": "train_splits", "valid": "dev_splits_complete", "test": "output_repeated_splits_test"}
EMO_EVALUATION_LINE = re.compile(r"^\[(?P<start>[\d.]+)\s*-\s*(?P<end>[\d.]+)\]\s+(?P<utt>\S+)")


@dataclass(frozen=True)
class MediaItem:
    """Where one utterance's audio is: a file, optionally a segment of it (seconds)."""

    path: Path
    start: float | None = None
    end: float | None = None


def _root(spec: dict, source) -> Path:
    if not spec.get("root"):
        raise ErcDataError(source, f"media layout {spec.get('layout')!r} needs a root folder")
    root = Path(os.path.expandvars(str(spec["root"]))).expanduser()
    if not root.is_dir():
        raise ErcDataError(root, "missing media root folder")
    return root


def table_items(table: pd.DataFrame, spec: dict, files: DatasetFiles | None, source) -> list[MediaItem]:
    path = Path(os.path.expandvars(str(spec.get("table", ""))))
    index = read_csv(path, columns=["utterance_id", "media"], dtype={"utterance_id": str, "media": str})
    if index["utterance_id"].duplicated().any():
        raise ErcDataError(path, f"duplicate utterance_id {index['utterance_id'][index['utterance_id'].duplicated()].iloc[0]}")
    root = _root(spec, source) if spec.get("root") else path.parent
    index = index.set_index("utterance_id")
    missing = sorted(set(table["utterance_id"]) - set(index.index))
    if missing:
        raise ErcDataError(path, f"no media row for {len(missing)} utterances (first: {missing[0]})")
    rows = index.loc[table["utterance_id"]]
    starts = rows["start"] if "start" in rows else [None] * len(rows)
    ends = rows["end"] if "end" in rows else [None] * len(rows)
    return [MediaItem(root / m, None if pd.isna(s) else float(s), None if pd.isna(e) else float(e))
            for m, s, e in zip(rows["media"], starts, ends)]


def folder_items(table: pd.DataFrame, spec: dict, files: DatasetFiles | None, source) -> list[MediaItem]:
    if spec.get("root"):
        root = _root(spec, source)
    elif files is not None:
        root, _ = files.folder(spec.get("files", "clips"), suffixes=AUDIO_SUFFIXES | VIDEO_SUFFIXES)
    else:
        raise ErcDataError(source, "the folder layout needs a root or the dataset's files entry")
    return [MediaItem(root / u) for u in table["utterance_id"]]


def emo_evaluation_times(path: Path) -> dict[str, tuple[float, float]]:
    """IEMOCAP's `EmoEvaluation/<dialog>.txt`: `[start - end]\\tutterance\\t...` lines -> {utterance: (start, end)}."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError as e:
        raise ErcDataError(path, f"cannot read: {e.strerror}") from None
    return {m["utt"]: (float(m["start"]), float(m["end"])) for m in map(EMO_EVALUATION_LINE.match, lines) if m}


def iemocap_items(table: pd.DataFrame, spec: dict, files: DatasetFiles | None, source) -> list[MediaItem]:
    root = _root(spec, source)
    times: dict[str, dict] = {}
    items = []
    for utt in table["utterance_id"]:
        dialog, session = utt.rsplit("_", 1)[0], f"Session{int(utt[3:5])}"
        sentence = root / session / "sentences" / "wav" / dialog / f"{utt}.wav"
        if sentence.is_file():
            items.append(MediaItem(sentence))
            continue
        evaluation = root / session / "dialog" / "EmoEvaluation" / f"{dialog}.txt"
        if not evaluation.is_file():
            items.append(MediaItem(sentence))  # neither: reading it reports the missing sentence file
            continue
        if dialog not in times:
            times[dialog] = emo_evaluation_times(evaluation)
        if utt not in times[dialog]:
            raise ErcDataError(evaluation, f"no time span for {utt}")
        start, end = times[dialog][utt]
        items.append(MediaItem(root / session / "dialog" / "wav" / f"{dialog}.wav", start, end))
    return items


def meld_items(table: pd.DataFrame, spec: dict, files: DatasetFiles | None, source) -> list[MediaItem]:
    root = _root(spec, source)
    dirs = {**MELD_DIRS, **(spec.get("dirs") or {})}
    found = {}
    for split, name in dirs.items():
        candidates = [root / name, *sorted(root.glob(f"*/{name}"))]
        found[split] = next((c for c in candidates if c.is_dir()), root / name)
    items = []
    for utt, split in zip(table["utterance_id"], table["split"]):
        match = re.fullmatch(r"\w+?_(dia\d+_utt\d+)", utt)
        if match is None:
            raise ErcDataError(source, f"utterance id {utt!r} is not erc's MELD form <split>_dia<D>_utt<U>")
        items.append(MediaItem(found[split] / f"{match[1]}.{spec.get('suffix', 'mp4')}"))
    return items


LAYOUTS = {"table": table_items, "folder": folder_items, "iemocap_release": iemocap_items, "meld_release": meld_items}


def media_items(table: pd.DataFrame, spec: dict, files: DatasetFiles | None = None, *, source="params.yaml") -> list[MediaItem]:
    """One MediaItem per row of `table`, by the layout that `spec` names."""
    layout = spec.get("layout")
    if layout not in LAYOUTS:
        raise ErcDataError(source, f"unknown media layout {layout!r}; known: {sorted(LAYOUTS)}")
    return LAYOUTS[layout](table, spec, files, source)

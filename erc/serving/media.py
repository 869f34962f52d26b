"""A model's audio and video feature sets recomputed from a conversation's media, for `erc predict`.

A conversation gives media per utterance in an `audio` or `video` column (a path relative to the conversation
file's folder, or absolute; any format `erc.features.audio` reads), optionally cut by `start` and `end` seconds.
Each feature set a model takes records how the featurize stage made it (`erc.tracking.model_info`: the set's
description, e.g. `kind: opensmile, set: eGeMAPSv02`, or a speech or frame encoder's `model`, `layer`, ...). Its
values are made again by the stage's own code with those settings (`erc.features.featurize.audio_extractors` and
`featurize_media`, one process), so a clip gives the numbers the stage gave it; `erc predict` then standardises
them with the training split's statistics, as training did.

A set that erc did not compute from media (a third-party export read by an adapter, such as IEMOCAP's
`acoustic8`, or an encoder tuned on the training labels, whose weights stay with the featurize stage) cannot be
made again: a conversation giving media for it is one line naming the set and why, unless its modality is taken
as missing (`--missing audio`). VoiceERC's `prosody8` is recomputed by `erc.features.prosody`: VoiceERC's method,
erc's code, so its values approach but need not equal VoiceERC's CSVs (a note on stderr says so).
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import pandas as pd

from erc.data.media import MediaItem
from erc.errors import ErcDataError

# modality -> the columns its media may come from, in order: an audio set also hears a video's sound track
MEDIA_COLUMNS = {"audio": ("audio", "video"), "video": ("video",)}
SEGMENT_COLUMNS = ("start", "end")


@dataclass(frozen=True)
class Recipe:
    """How a feature set is made again: `family` (acoustic, speech, visual, prosody) and the settings its
    extractor was built with."""

    name: str
    family: str
    spec: dict


def recipe(name: str, fs: dict) -> Recipe | str:
    """The Recipe of feature set `name` (its description in the model's info), or why erc cannot make it again."""
    from erc.features.acoustic import EXTRACTORS

    if fs.get("finetune"):
        return ("its encoder was fine-tuned on the training labels (featurize stage 1), and the tuned weights are "
                "not logged with the model")
    if fs.get("modality") == "audio" and fs.get("kind") in EXTRACTORS:
        return Recipe(name, "acoustic", {"kind": fs["kind"], **_settings(EXTRACTORS[fs["kind"]], fs)})
    if fs.get("modality") == "audio" and fs.get("model"):
        from erc.features.speech import SpeechEncoder

        return Recipe(name, "speech", _settings(SpeechEncoder, fs, drop=("finetune",)))
    if fs.get("modality") == "video" and fs.get("model"):
        from erc.features.vision import FrameEncoder

        return Recipe(name, "visual", _settings(FrameEncoder, fs))
    if fs.get("modality") == "audio" and _is_prosody8(name, fs):
        try:
            import erc.features.prosody  # noqa: F401
        except ImportError as e:
            return f"VoiceERC's prosody needs erc.features.prosody ({e})"
        return Recipe(name, "prosody", {"train_median": fs["train_median"]} if fs.get("train_median") else {})
    return ("it was read from files, not computed from media by erc's featurize stage (no extractor is recorded "
            "with it)")


def _settings(cls, fs: dict, drop=()) -> dict:
    """The constructor arguments of extractor class `cls` that the set's description records."""
    return {f.name: fs[f.name] for f in fields(cls) if f.name in fs and f.name not in drop}


def _is_prosody8(name: str, fs: dict) -> bool:
    from erc.data.voiceerc import COLUMNS

    return int(fs.get("dim", 0)) == len(COLUMNS) and (fs.get("columns") == COLUMNS or name == "prosody8")


def media_columns(table: pd.DataFrame, modality: str) -> list[str]:
    return [c for c in MEDIA_COLUMNS.get(modality, ()) if c in table]


class MediaInputs:
    """The model's feature sets that a conversation's media give: per modality its Recipe, extractors built once."""

    def __init__(self, recipes: dict[str, Recipe]):
        self.recipes = recipes
        self.extractors: dict[str, object] = {}
        self.filled = self.unanalysable = 0  # prosody8 clips with an empty cell filled, and too short for Praat

    @property
    def notes(self) -> list[str]:
        """What the caller should say on stderr about the values, so far."""
        r = next((x for x in self.recipes.values() if x.family == "prosody"), None)
        if r is None:
            return []
        out = [f"{r.name} is VoiceERC's method recomputed by erc from the audio (erc.features.prosody), not "
               f"VoiceERC's own values: near the CSVs the model learnt from, not equal to them"]
        if self.filled:
            out.append(f"{self.filled} clip(s) had no value for a pitch, HNR or rate cell of {r.name} (an empty cell "
                       f"in VoiceERC's CSVs); filled with the training split's "
                       f"{'median' if r.spec.get('train_median') else 'mean'}, as near as the model records it")
        if self.unanalysable:
            out.append(f"{self.unanalysable} clip(s) too short for Praat: no {r.name}, their audio missing for the "
                       f"model (VoiceERC's CSVs have no row for such clips)")
        return out

    def load(self) -> MediaInputs:
        """Build every extractor (a speech or frame encoder loads its model here, before any prediction)."""
        from erc.features.featurize import audio_extractors

        for modality, r in self.recipes.items():
            if modality in self.extractors:
                continue
            if r.family in ("acoustic", "speech"):
                self.extractors[modality] = audio_extractors({r.family: {r.name: dict(r.spec)}}, None,
                                                             source=f"feature set {r.name}")[r.name]
            elif r.family == "visual":
                from erc.features.vision import FrameEncoder

                self.extractors[modality] = FrameEncoder(**r.spec)
            else:
                self.extractors[modality] = None  # prosody: a function, no state
        return self

    def items(self, table: pd.DataFrame, path, modality: str) -> list[MediaItem | None]:
        """Each row's MediaItem (None for an empty cell); files checked to exist, segments to be numbers with
        0 <= start < end. `table` may be a part of the file (its index the file's rows, for messages)."""
        folder = Path(path).parent
        columns = media_columns(table, modality)
        items = []
        for i, row in enumerate(table.index):
            cell, column = next(((v, c) for c in columns if _given(v := table[c].iloc[i])), (None, None))
            if cell is None:
                items.append(None)
                continue
            file = Path(str(cell)).expanduser()
            file = file if file.is_absolute() else folder / file
            if not file.is_file():
                raise ErcDataError(path, f"row {row + 1}: {column} {str(cell)!r}: no such file ({file})")
            start, end = (_seconds(table[c].iloc[i], path, row, c) if c in table else None for c in SEGMENT_COLUMNS)
            if start is not None and end is not None and end <= start:
                raise ErcDataError(path, f"row {row + 1}: end {end} s is not after start {start} s")
            if self.recipes[modality].family == "visual" and (start is not None or end is not None):
                raise ErcDataError(path, f"row {row + 1}: a video segment (start/end) for the visual set "
                                         f"{self.recipes[modality].name!r}: its frame encoder reads whole clips")
            items.append(MediaItem(file, start, end))
        return items

    def features(self, table: pd.DataFrame, path, modality: str, dim: int,
                 stats: tuple | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(N, `dim`) raw values and (N,) present of `modality`'s set for the rows of `table` that give media;
        `stats` (mean, std) are the training split's."""
        r = self.recipes[modality]
        items = self.items(table, path, modality)
        rows = [i for i, item in enumerate(items) if item is not None]
        given = [items[i] for i in rows]
        if r.family == "prosody":
            vectors, ok = self._prosody(given, stats)
        elif given:
            vectors, ok = self._featurize(r, given, modality), np.ones(len(given), dtype=bool)
        else:
            vectors, ok = np.zeros((0, 0), dtype=np.float32), np.zeros(0, dtype=bool)
        if rows and vectors.shape[1] != dim:  # another version of the extractor's library, say
            raise ErcDataError(path, f"{r.name} recomputed from media has {vectors.shape[1]} values; the model's "
                                     f"set has {dim}")
        values, present = np.zeros((len(table), dim), dtype=np.float32), np.zeros(len(table), dtype=bool)
        if rows:
            values[rows], present[rows] = vectors, ok
        return values, present

    def _featurize(self, r: Recipe, items: list[MediaItem], modality: str) -> np.ndarray:
        """The featurize stage's own pass (reading, extraction, its NaN handling) over `items`, in one process."""
        from erc.features.featurize import featurize_media

        read = "video" if r.family == "visual" else "audio"
        with tempfile.TemporaryDirectory(prefix="erc-media-") as tmp:
            featurize_media(items, {r.name: self.extractors[modality]}, tmp, source=["erc predict"], modality=read,
                            progress=False, workers=1)
            return np.load(Path(tmp) / f"{r.name}.npy", allow_pickle=False)

    def _prosody(self, items: list[MediaItem], stats: tuple | None) -> tuple[np.ndarray, np.ndarray]:
        """prosody8 per item. A cell VoiceERC's CSV leaves empty (NaN) takes the value training filled it with:
        the training split's median where the model records it, else its mean (the feature statistics); a clip
        Praat cannot analyse has no row in VoiceERC's CSVs, so its audio is missing, as in training."""
        from erc.data.voiceerc import COLUMNS
        from erc.features.audio import MediaError, load_audio
        from erc.features.prosody import prosody8

        r = next(x for x in self.recipes.values() if x.family == "prosody")
        median = r.spec.get("train_median") or {}
        fill = np.array([median.get(c, np.nan) for c in COLUMNS], dtype=np.float64)
        if stats is not None:
            fill = np.where(np.isnan(fill), np.asarray(stats[0], dtype=np.float64), fill)
        out, ok = np.zeros((len(items), len(COLUMNS)), np.float32), np.ones(len(items), bool)
        for i, item in enumerate(items):
            wave = load_audio(item)  # a missing, corrupt or silent file: its one-line error
            try:
                vector = prosody8(wave, source=item.path)
            except MediaError:
                ok[i] = False
                self.unanalysable += 1
                continue
            empty = np.isnan(vector)
            self.filled += int(empty.any())
            out[i] = np.where(empty, fill, vector)
        return out, ok


def _given(value) -> bool:
    return not (value is None or (isinstance(value, float) and math.isnan(value))
                or (isinstance(value, str) and not value.strip()))


def _seconds(value, path, row: int, column: str) -> float | None:
    if not _given(value):
        return None
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise ErcDataError(path, f"row {row + 1}: {column} {value!r} is not a number of seconds") from None
    if not math.isfinite(seconds) or seconds < 0:
        raise ErcDataError(path, f"row {row + 1}: {column} {value!r} must be a finite number of seconds >= 0")
    return seconds


def media_inputs(table: pd.DataFrame, path, info: dict, missing=()) -> MediaInputs | None:
    """How the model's sets are made from the media `table` gives, for the modalities not taken as `missing`;
    None when it gives none. A set erc cannot make again is one line naming it and why."""
    recipes = {}
    for modality, name in info["inputs"].items():
        if modality in missing or not media_columns(table, modality):
            continue
        made = recipe(name, info["feature_sets"][name])
        if isinstance(made, str):
            raise ErcDataError(path, f"{'/'.join(media_columns(table, modality))} given, but the model's {modality} "
                                     f"feature set {name!r} cannot be recomputed from media: {made}; give "
                                     f"{modality}_features, or --missing {modality} for the model's missing-"
                                     f"{modality} path")
        recipes[modality] = made
    return MediaInputs(recipes) if recipes else None

"""VoiceERC's published prosodic features (zehuiwu/VoiceERC, `speech_features/`) as the `prosody8` feature set.

8 values per utterance, extracted by the SpeechCueLLM authors from the original audio: duration, mean
intensity, intensity variation, mean pitch, pitch std, pitch range, articulation rate, mean HNR.

- IEMOCAP: `iemocap_audio_features.csv`, utterance id = `<video_id>_<gender><segment_id:03d>`.
- MELD: `meld_{train,dev,test}_audio_features.csv`, `filename` = `dia<D>_utt<U>.wav` of that split, erc's id
  `<split>_dia<D>_utt<U>`. Rows for utterances that erc does not have (dev and test have a few) are ignored.

An utterance without a row gets zeros and `present = False` (the modality mask). Empty cells (pitch or rate of
an unvoiced clip) are filled with the column's median over the training split's rows, and counted in the set's
info: a value, not a missing modality, so the rest of the row is kept.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from erc.data.canonical import FeatureSet, check_features
from erc.data.readers import read_csv
from erc.errors import ErcDataError
from erc.sources import DatasetFiles

COLUMNS = ["duration", "avg_intensity", "intensity_variation", "avg_pitch", "pitch_std", "pitch_range",
           "articulation_rate", "mean_hnr"]
MELD_FILES = {"train": "prosody_train", "valid": "prosody_dev", "test": "prosody_test"}


def _numeric(df: pd.DataFrame, path) -> np.ndarray:
    try:
        return df[COLUMNS].apply(pd.to_numeric, errors="raise").to_numpy(dtype=np.float64)
    except ValueError as e:
        raise ErcDataError(path, f"non-numeric prosody value ({e})") from None


def _feature_set(table: pd.DataFrame, by_id: dict[str, np.ndarray], sources: list[str]) -> FeatureSet:
    ids = table["utterance_id"].to_numpy()
    present = np.array([u in by_id for u in ids])
    values = np.full((len(table), len(COLUMNS)), np.nan)
    values[present] = np.stack([by_id[u] for u in ids[present]])
    train = present & (table["split"].to_numpy() == "train")
    empty = np.isnan(values) & present[:, None]
    medians = np.nanmedian(values[train], axis=0)
    values = np.where(empty, medians, values)
    values[~present] = 0.0
    values = check_features(values, source=sources[0])
    # the medians too: prediction fills a recomputed clip's empty cells as training did (erc.features.prosody)
    info = {"columns": COLUMNS, "empty_cells_filled_with_train_median": {c: int(n) for c, n in zip(COLUMNS, empty.sum(0)) if n},
            "train_median": {c: float(m) for c, m in zip(COLUMNS, medians)}}
    return FeatureSet("prosody8", "audio", values, sources, None if present.all() else present, info)


def iemocap_prosody(table: pd.DataFrame, files: DatasetFiles) -> FeatureSet:
    path = files.path("prosody")
    df = read_csv(path, columns=["video_id", "segment_id", "gender", *COLUMNS])
    ids = df["video_id"].astype(str) + "_" + df["gender"].astype(str) + df["segment_id"].astype(int).map("{:03d}".format)
    if ids.duplicated().any():
        raise ErcDataError(path, f"duplicate utterance {ids[ids.duplicated()].iloc[0]}")
    return _feature_set(table, dict(zip(ids, _numeric(df, path))), [files.entries["prosody"]["url"]])


def meld_prosody(table: pd.DataFrame, files: DatasetFiles) -> FeatureSet:
    by_id, sources = {}, []
    for split, name in MELD_FILES.items():
        path = files.path(name)
        df = read_csv(path, columns=["filename", *COLUMNS], dtype={"filename": str})
        stems = df["filename"].str.extract(r"^(dia\d+_utt\d+)\.wav$")[0]
        if stems.isna().any():
            raise ErcDataError(path, f"filename {df['filename'][stems.isna()].iloc[0]!r} is not dia<D>_utt<U>.wav")
        by_id.update(zip(f"{split}_" + stems, _numeric(df, path)))
        sources.append(files.entries[name]["url"])
    return _feature_set(table, by_id, sources)

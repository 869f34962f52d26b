"""CMU-MOSI from the bc-LSTM release (declare-lab/multimodal-deep-learning) and the CMU SDK labels.

- Utterances, text and video: `transcripts.csv` (id `<video>_<k>`, text, video number, binary label).
- Features: `text_{split}.csv` column 0 is the row of `transcripts.csv`; `{text,audio,video}/*_{split}0.csv`
  are row-aligned with it (100/73/100 values, then the binary label).
- Sentiment: `CMU_MOSI_Opinion_Labels.csd` (HDF5) holds the continuous score in [-3, 3]; segment k of
  video v, counted from 1 by start time, is transcript `v_k`.
- Binary label: positive iff score >= 0 (the convention of the bc-LSTM labels and most MOSI papers).
- Dialogue = video; turn = k - 1. MOSI ships train and test only: `valid_fraction` of the training
  videos become validation, chosen by sha256(`<valid_seed>:<video>`) so the choice is deterministic and
  independent of file order.
"""

from __future__ import annotations

import h5py
import numpy as np
import pandas as pd

from erc.data.canonical import FeatureSet, Prepared, make_table, validation_dialogues
from erc.data.readers import read_csv, read_matrix_csv
from erc.errors import ErcDataError
from erc.sources import DatasetFiles

SENTIMENTS = ["negative", "positive"]
FEATURE_DIMS = {"text": 100, "audio": 73, "video": 100}



# bc-LSTM's text and video features are the hidden states of networks trained with the sentiment labels of MOSI's
# whole training split, which holds erc's validation videos; its audio set is openSMILE's, made without labels.
LABEL_DERIVED = {m: {"label_derived": True, "label_derived_why": "learnt with the labels of MOSI's training split, "
                     "which holds erc's validation videos"} for m in ("text", "video")}

def read_scores(path) -> dict[str, float]:
    """Transcript id -> continuous sentiment, from the SDK's computational sequence."""
    try:
        with h5py.File(path, "r") as f:
            data = f["Opinion Segment Labels"]["data"]
            scores = {}
            for video in data:
                intervals = np.asarray(data[video]["intervals"])
                values = np.asarray(data[video]["features"]).reshape(-1)
                for k, i in enumerate(np.argsort(intervals[:, 0], kind="stable"), start=1):
                    scores[f"{video}_{k}"] = float(values[i])
    except (OSError, KeyError) as e:
        raise ErcDataError(path, f"not a MOSI opinion-label computational sequence ({e})") from None
    return scores


def build(files: DatasetFiles, options: dict) -> tuple[Prepared, list[str]]:
    transcripts_path = files.path("transcripts")
    transcripts = read_csv(transcripts_path, header=None, dtype=str, keep_default_na=False)
    if transcripts.shape[1] != 4:
        raise ErcDataError(transcripts_path, f"{transcripts.shape[1]} columns, expected 4 (id, text, video, label)")
    transcripts.columns = ["utterance_id", "text", "video_no", "label"]
    scores_path = files.path("opinion_labels")
    scores = read_scores(scores_path)

    rows, feats = [], {m: [] for m in FEATURE_DIMS}
    for split in ("train", "test"):
        index_path = files.path(f"text_{split}_index")
        index = read_matrix_csv(index_path, columns=1 + FEATURE_DIMS["text"])[:, 0].astype(int)
        if index.min() < 0 or index.max() >= len(transcripts):
            raise ErcDataError(index_path, f"row index outside transcripts.csv (0..{len(transcripts) - 1})")
        for modality, dim in FEATURE_DIMS.items():
            path = files.path(f"{modality}_{split}")
            matrix = read_matrix_csv(path, columns=dim + 1)
            if len(matrix) != len(index):
                raise ErcDataError(path, f"{len(matrix)} rows, but {index_path.name} has {len(index)}")
            feats[modality].append(matrix[:, :dim])
        part = transcripts.iloc[index].copy()
        part["split"] = split
        rows.append(part)
    table = pd.concat(rows, ignore_index=True)
    missing = sorted(set(table["utterance_id"]) - set(scores))
    if missing:
        raise ErcDataError(scores_path, f"no sentiment for {len(missing)} utterances (first: {missing[0]})")

    table["dialogue_id"] = table["utterance_id"].str.rsplit("_", n=1).str[0]
    table["k"] = table["utterance_id"].str.rsplit("_", n=1).str[1].astype(int)
    valid = validation_dialogues(sorted(table.loc[table["split"] == "train", "dialogue_id"].unique()),
                              options.get("valid_fraction", 0.15), options.get("valid_seed", 0))
    table.loc[table["dialogue_id"].isin(valid), "split"] = "valid"
    table["sentiment_score"] = table["utterance_id"].map(scores)
    table["sentiment_id"] = (table["sentiment_score"] >= 0).astype(np.int16)
    table["sentiment"] = np.asarray(SENTIMENTS, dtype=object)[table["sentiment_id"]]
    table["speaker"] = table["dialogue_id"]  # one speaker per video

    # Dialogue order: videos by id, segments by k; features follow the same permutation.
    order = table.sort_values(["dialogue_id", "k"], kind="stable").index.to_numpy()
    table = table.loc[order].reset_index(drop=True)
    table["turn"] = table.groupby("dialogue_id").cumcount()

    agree = float((table["label"].astype(int) == table["sentiment_id"]).mean())
    source_names = {"text": "text_{}", "audio": "audio_{}", "video": "video_{}"}
    features = {
        f"bclstm_{m}": FeatureSet(f"bclstm_{m}", m, np.concatenate(feats[m])[order].astype(np.float32),
                                  [files.entries[source_names[m].format(s)]["url"] for s in ("train", "test")],
                                  info=dict(LABEL_DERIVED.get(m, {"label_derived": False})))
        for m in FEATURE_DIMS
    }
    meta = {
        "dataset": "mosi",
        "target": "sentiment",
        "emotion_labels": [],
        "sentiment_labels": SENTIMENTS,
        "has_sentiment_score": True,
        "sources": files.checksums(),
        "notes": [
            "binary sentiment: positive iff the continuous score >= 0",
            f"the binary labels shipped with the bc-LSTM features agree with score >= 0 on {agree:.4f} of utterances",
            f"validation: {len(valid)} training videos chosen by sha256('<valid_seed>:<video>'), "
            f"valid_fraction={options.get('valid_fraction', 0.15)}, valid_seed={options.get('valid_seed', 0)}",
        ],
    }
    return Prepared(make_table(table), meta, features), sorted(table["dialogue_id"].unique())

"""MELD from the official CSVs (declare-lab/MELD): train, dev (= validation) and test.

Dialogue = Dialogue_ID within a split (ids restart per split); turn = rank of Utterance_ID within it
(the CSVs have a few gaps in Utterance_ID, so ids are ordered, not trusted to be contiguous).
Text is repaired for cp1252/UTF-8 damage (see erc.data.text_repair). 7 emotions, 3 sentiments.
"""

from __future__ import annotations

import io

import numpy as np
import pandas as pd

from erc.data import voiceerc
from erc.data.canonical import Prepared, make_table
from erc.data.readers import label_ids, read_csv
from erc.data.text_repair import decode, repair
from erc.errors import ErcDataError
from erc.sources import DatasetFiles

EMOTIONS = ["neutral", "surprise", "fear", "sadness", "joy", "disgust", "anger"]
SENTIMENTS = ["negative", "neutral", "positive"]
COLUMNS = ["Utterance", "Speaker", "Emotion", "Sentiment", "Dialogue_ID", "Utterance_ID"]
SPLIT_FILES = {"train": "train", "valid": "dev", "test": "test"}


def read_split(path) -> pd.DataFrame:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ErcDataError(path, f"cannot read: {e.strerror}") from None
    try:
        df = read_csv(io.StringIO(decode(raw)), columns=None, dtype=str, keep_default_na=False)
    except ErcDataError as e:  # read_csv names the in-memory buffer; name the file instead
        raise ErcDataError(path, e.problem) from None
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise ErcDataError(path, f"missing column(s) {missing}; has {list(df.columns)}")
    for col in ("Dialogue_ID", "Utterance_ID"):
        bad = ~df[col].str.fullmatch(r"\d+")
        if bad.any():
            raise ErcDataError(path, f"non-integer {col} {df.loc[bad, col].iloc[0]!r} in row {int(bad.argmax()) + 2}")
    return df


def build(files: DatasetFiles, options: dict) -> tuple[Prepared, list[str]]:
    parts = []
    for split, stem in SPLIT_FILES.items():
        path = files.path(stem)
        df = read_split(path)
        df["emotion_id"] = label_ids(df["Emotion"].str.strip().str.lower(), EMOTIONS, source=path)
        df["sentiment_id"] = label_ids(df["Sentiment"].str.strip().str.lower(), SENTIMENTS, source=path)
        df["dialogue_num"] = df["Dialogue_ID"].astype(int)
        df["utterance_num"] = df["Utterance_ID"].astype(int)
        df["split"] = split
        parts.append(df)
    df = pd.concat(parts, ignore_index=True)
    df = df.sort_values(["split", "dialogue_num", "utterance_num"], kind="stable",
                        key=lambda c: c.map({s: i for i, s in enumerate(SPLIT_FILES)}) if c.name == "split" else c)
    df["dialogue_id"] = df["split"] + "_dia" + df["Dialogue_ID"]
    df["utterance_id"] = df["dialogue_id"] + "_utt" + df["Utterance_ID"]
    df["turn"] = df.groupby("dialogue_id").cumcount()
    df["text"] = df["Utterance"].map(repair).str.strip()
    df["speaker"] = df["Speaker"].map(repair).str.strip()
    df["emotion"] = np.asarray(EMOTIONS, dtype=object)[df["emotion_id"]]
    df["sentiment"] = np.asarray(SENTIMENTS, dtype=object)[df["sentiment_id"]]
    meta = {
        "dataset": "meld",
        "target": "emotion",
        "emotion_labels": EMOTIONS,
        "sentiment_labels": SENTIMENTS,
        "has_sentiment_score": False,
        "sources": files.checksums(),
        "notes": ["validation = the official dev split",
                  "dialogue ids are '<split>_dia<Dialogue_ID>' because MELD numbers dialogues per split"],
    }
    table = make_table(df)
    features = {"prosody8": voiceerc.meld_prosody(table, files)} if "prosody_train" in files.entries else {}
    return Prepared(table, meta, features), sorted(df["dialogue_id"].unique())

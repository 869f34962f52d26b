"""IEMOCAP, 6 classes (hap, sad, neu, ang, exc, fru), from three public releases.

- tae898/multimodal-datasets: `utterance-ordered.json` (dialogue order and the train/val/test split, by
  dialogue: 100/20/31), `emotions.json` (labels), `raw-texts/<split>/<utterance>.json` (text, speaker).
- MrCrowbar/Speech_Emotion_Recognition: `audio_features.csv`, 8 acoustic features per utterance id
  (`wav_file`), joined by id. Utterances without a row get zeros and `present = False`.
- declare-lab/conv-emotion (COSMIC): `iemocap.pkl`, read only through the restricted unpickler, as a
  cross-check of the label sequences and the test dialogues; its numbers go into meta.json.

Only utterances with one of the 6 labels are kept (as COSMIC and most ERC papers do); the others
(undecided, surprise, fear, ...) are dropped, not kept as unlabelled context.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from erc.data import voiceerc
from erc.data.canonical import FeatureSet, Prepared, check_features, make_table
from erc.data.readers import read_csv, read_json
from erc.errors import ErcDataError
from erc.safe_pickle import load_restricted
from erc.sources import DatasetFiles

EMOTIONS = ["hap", "sad", "neu", "ang", "exc", "fru"]  # COSMIC's order, so ids compare directly
TAE898_NAMES = {"happiness": "hap", "sadness": "sad", "neutral": "neu", "anger": "ang",
                "excited": "exc", "frustration": "fru"}
SPLITS = {"train": "train", "val": "valid", "test": "test"}
AUDIO_COLUMNS = ["sig_mean", "sig_std", "rmse_mean", "rmse_std", "silence", "harmonic", "auto_corr_max", "auto_corr_std"]


def _split_map(obj, path, what) -> dict:
    if not isinstance(obj, dict) or set(obj) != set(SPLITS):
        raise ErcDataError(path, f"expected {what} keyed by {sorted(SPLITS)}")
    return obj


def build(files: DatasetFiles, options: dict) -> tuple[Prepared, list[str]]:
    order_path = files.path("utterance_ordered")
    ordered = _split_map(read_json(order_path), order_path, "dialogues")
    emotions_path = files.path("emotions")
    emotions = _split_map(read_json(emotions_path), emotions_path, "labels")

    rows = []
    for tae_split, split in SPLITS.items():
        for dialogue, utterances in ordered[tae_split].items():
            for utt in utterances:
                name = emotions[tae_split].get(utt)
                if name is None:
                    raise ErcDataError(emotions_path, f"no label for utterance {utt}")
                if name in TAE898_NAMES:
                    rows.append({"dialogue_id": dialogue, "utterance_id": utt, "split": split,
                                 "tae_split": tae_split, "emotion": TAE898_NAMES[name]})
    table = pd.DataFrame(rows)
    dialogues = [d for s in SPLITS for d in ordered[s]]

    # The checksum covers every transcript the split lists, not only the 6-class ones we keep.
    texts = files.tree("raw_texts", [f"{s}/{u}.json" for s in SPLITS for d in ordered[s] for u in ordered[s][d]])
    text, speaker = [], []
    for s, u in zip(table["tae_split"], table["utterance_id"]):
        path = texts[f"{s}/{u}.json"]
        record = read_json(path)
        if not isinstance(record, dict) or "Utterance" not in record or "Speaker" not in record:
            raise ErcDataError(path, "expected an object with 'Utterance' and 'Speaker'")
        text.append(str(record["Utterance"]).strip())
        speaker.append(str(record["Speaker"]))
    table["text"], table["speaker"] = text, speaker
    table["emotion_id"] = table["emotion"].map({n: i for i, n in enumerate(EMOTIONS)}).astype(np.int16)
    table["turn"] = table.groupby("dialogue_id").cumcount()

    audio_path = files.path("audio_features")
    audio = read_csv(audio_path, columns=["wav_file", *AUDIO_COLUMNS])
    if audio["wav_file"].duplicated().any():
        raise ErcDataError(audio_path, f"duplicate wav_file {audio['wav_file'][audio['wav_file'].duplicated()].iloc[0]}")
    audio = audio.set_index("wav_file")[AUDIO_COLUMNS]
    try:
        audio_values = audio.to_numpy(dtype=np.float64)
    except ValueError as e:
        raise ErcDataError(audio_path, f"non-numeric feature value ({e})") from None
    check_features(audio_values, source=audio_path)
    row_of = {u: i for i, u in enumerate(audio.index)}
    present = table["utterance_id"].map(lambda u: u in row_of).to_numpy()
    values = np.zeros((len(table), len(AUDIO_COLUMNS)), dtype=np.float32)
    values[present] = audio_values[[row_of[u] for u in table["utterance_id"][present]]]
    features = {"acoustic8": FeatureSet("acoustic8", "audio", values, [files.entries["audio_features"]["url"]],
                                        present if not present.all() else None, {"columns": AUDIO_COLUMNS})}

    meta = {
        "dataset": "iemocap",
        "target": "emotion",
        "emotion_labels": EMOTIONS,
        "sentiment_labels": [],
        "has_sentiment_score": False,
        "sources": files.checksums(),
        "cosmic_crosscheck": crosscheck_cosmic(table, files),
        "notes": [
            "split by dialogue from tae898's utterance-ordered.json: train/val/test = 100/20/31 dialogues",
            "only the 6 classes hap, sad, neu, ang, exc, fru are kept; other utterances are dropped",
            f"{int((~present).sum())} utterances have no row in audio_features.csv: zeros, present=False",
        ],
    }
    table = make_table(table)
    if "prosody" in files.entries:  # VoiceERC's 8 prosodic features
        features["prosody8"] = voiceerc.iemocap_prosody(table, files)
    return Prepared(table, meta, features), dialogues


def crosscheck_cosmic(table: pd.DataFrame, files: DatasetFiles) -> dict:
    """Compare with COSMIC's iemocap.pkl: utterance counts, test dialogues, per-dialogue label sequences."""
    if "cosmic" not in files.entries:
        return {}
    path = files.path("cosmic")
    data = load_restricted(path)
    try:
        _speakers, labels, _sentences, train_ids, test_ids, valid_ids = data
        cosmic_labels = {d: [int(x) for x in seq] for d, seq in labels.items()}
    except (TypeError, ValueError) as e:
        raise ErcDataError(path, f"not COSMIC's [speakers, labels, sentences, train, test, valid] ({e})") from None
    ours = table.groupby("dialogue_id", sort=False)["emotion_id"].apply(list).to_dict()
    our_test = set(table.loc[table["split"] == "test", "dialogue_id"])
    same = sum(1 for d, seq in ours.items() if cosmic_labels.get(d) == [int(x) for x in seq])
    return {
        "cosmic_utterances": sum(len(v) for v in cosmic_labels.values()),
        "our_utterances": int(len(table)),
        "cosmic_dialogues": {"train": len(train_ids), "valid": len(valid_ids), "test": len(test_ids)},
        "test_dialogues_identical": our_test == set(test_ids),
        "dialogues_with_identical_label_sequence": same,
        "dialogues_compared": len(ours),
    }

"""VoiceERC's prosodic features joined to erc's utterance ids: missing rows masked, empty cells filled, bad files named."""

from __future__ import annotations

import hashlib

import pytest

from erc.data import canonical, voiceerc
from erc.errors import ErcDataError
from erc.sources import DatasetFiles

HEADER = ",".join(voiceerc.COLUMNS)


def entry(path):
    return {"url": f"https://raw.githubusercontent.com/o/r/c/{path.name}",
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


def table(ids_splits):
    return canonical.make_table([{"dialogue_id": u.rsplit("_", 1)[0], "turn": 0, "utterance_id": u, "speaker": "A",
                                  "split": s} for u, s in ids_splits])


def files_for(tmp_path, monkeypatch, contents: dict) -> DatasetFiles:
    monkeypatch.setenv("ERC_DATA_MIRROR", str(tmp_path / "mirror"))
    entries = {}
    for name, text in contents.items():
        path = tmp_path / "mirror" / "o" / "r" / "c" / f"{name}.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        entries[name] = entry(path)
    return DatasetFiles(entries, tmp_path / "cache")


def test_meld_rows_join_by_split_and_file_name(tmp_path, monkeypatch):
    files = files_for(tmp_path, monkeypatch, {
        "prosody_train": f"filename,{HEADER}\ndia0_utt0.wav,1,2,3,100,5,6,7,8\ndia0_utt1.wav,2,2,3,,5,6,,8\n"
                         f"dia1_utt0.wav,3,2,3,300,5,6,9,8\n",
        "prosody_dev": f"filename,{HEADER}\ndia0_utt0.wav,9,9,9,9,9,9,9,9\ndia7_utt7.wav,1,1,1,1,1,1,1,1\n",
        "prosody_test": f"filename,{HEADER}\n"})
    t = table([("train_dia0_utt0", "train"), ("train_dia0_utt1", "train"), ("train_dia1_utt0", "train"),
               ("valid_dia0_utt0", "valid"), ("test_dia0_utt0", "test")])
    fs = voiceerc.meld_prosody(t, files)
    assert fs.name == "prosody8" and fs.modality == "audio" and fs.values.shape == (5, 8)
    assert fs.present.tolist() == [True, True, True, True, False]
    assert fs.values[1, 3] == 200.0 and fs.values[1, 6] == 8.0  # empty cells: the training median
    assert fs.info["empty_cells_filled_with_train_median"] == {"avg_pitch": 1, "articulation_rate": 1}
    # recorded, so that a clip recomputed at prediction is filled as training filled it
    assert fs.info["train_median"]["avg_pitch"] == 200.0 and fs.info["train_median"]["duration"] == 2.0
    assert fs.values[3, 0] == 9.0 and not fs.values[4].any()


def test_iemocap_ids_and_a_bad_value_named(tmp_path, monkeypatch):
    cols = "video_id,segment_id,gender,emotion"
    files = files_for(tmp_path, monkeypatch, {"prosody": f"{cols},{HEADER}\nSes01F_impro01,3,M,neu,1,2,3,4,5,6,7,8\n"})
    fs = voiceerc.iemocap_prosody(table([("Ses01F_impro01_M003", "train")]), files)
    assert fs.present is None and fs.values[0].tolist() == [1, 2, 3, 4, 5, 6, 7, 8]
    files = files_for(tmp_path, monkeypatch, {"prosody": f"{cols},{HEADER}\nSes01F_impro01,3,M,neu,1,2,x,4,5,6,7,8\n"})
    with pytest.raises(ErcDataError, match=r"prosody\.csv: non-numeric prosody value"):
        voiceerc.iemocap_prosody(table([("Ses01F_impro01_M003", "train")]), files)

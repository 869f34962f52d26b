"""Raw-media layouts on generated files: the folder-per-label adapter, the media table, IEMOCAP's and MELD's
release layouts (MELD's clips are video), and the prepare -> featurize -> probe stages end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from erc.data import canonical, folder_labels
from erc.data.media import MediaItem, media_items
from erc.errors import ErcDataError
from erc.features.featurize import featurize_dataset
from erc.sources import DatasetFiles, sha256_of, tree_sha256
from tests.media_fixtures import tiny_image_model, tone, video_with_audio, write_audio

ROOT = Path(__file__).resolve().parent.parent
LABELS = {"Angry": 300.0, "Sad": 140.0}  # a label's clips share a pitch: the probe can learn it
OPTIONS = {"labels": ["angry", "sad"], "pattern": r"(?P<speaker>[MF]\d+)_(?P<label>[as])\d+\.wav$",
           "valid_fraction": 0.2, "test_fraction": 0.2}


def make_corpus(root: Path, speakers: int = 6, per_label: int = 3) -> Path:
    for label, pitch in LABELS.items():
        for s in range(speakers):
            for i in range(per_label):
                write_audio(root / label / f"{'MF'[s % 2]}{s}_{label[0].lower()}{i}.wav",
                            tone(0.6, pitch * (1 + 0.03 * s) + 5 * i, seed=s * 10 + i))
    return root


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus") / "clips")


def test_folder_per_label_adapter(corpus):
    prep, dialogues = folder_labels.build(DatasetFiles({"clips": {"path": str(corpus)}}), OPTIONS)
    t = prep.table
    assert len(t) == 36 and dialogues == list(t["dialogue_id"]) and (t["turn"] == 0).all()
    assert prep.meta["emotion_labels"] == ["angry", "sad"] and t.loc[0, "utterance_id"] == "Angry/F1_a0.wav"
    assert sorted(t["emotion"].unique()) == ["angry", "sad"] and t["speaker"].nunique() == 6
    assert (t.groupby("speaker")["split"].nunique() == 1).all()  # speaker-independent splits
    assert set(t["split"]) == {"train", "valid", "test"}
    canonical.validate(prep, where="x")
    by_pattern, _ = folder_labels.build(DatasetFiles({"clips": {"path": str(corpus)}}),
                                        {**OPTIONS, "label_from": "pattern", "labels": {"angry": ["a"], "sad": ["s"]}})
    assert (by_pattern.table["emotion"] == t["emotion"]).all()


def test_folder_adapter_errors_name_the_clip(tmp_path, corpus):
    files = DatasetFiles({"clips": {"path": str(corpus)}})
    with pytest.raises(ErcDataError, match=r"Angry/F1_a0\.wav: label 'Angry' is not in the label set \['sad'\]"):
        folder_labels.build(files, {**OPTIONS, "labels": ["sad"]})
    with pytest.raises(ErcDataError, match=r"Angry/F1_a0\.wav: file name does not match the pattern"):
        folder_labels.build(files, {**OPTIONS, "pattern": r"^nothing"})
    with pytest.raises(ErcDataError, match="missing folder for 'clips'"):
        folder_labels.build(DatasetFiles({"clips": {"path": str(tmp_path / "nope")}}), OPTIONS)


def test_folder_from_the_mirror_is_checked_against_its_tree_hash(tmp_path, corpus, monkeypatch):
    url = "https://raw.githubusercontent.com/someone/corpus/abc123"
    mirror_root = tmp_path / "mirror" / "someone" / "corpus" / "abc123"
    mirror_root.parent.mkdir(parents=True)
    os.symlink(corpus, mirror_root)
    monkeypatch.setenv("ERC_DATA_MIRROR", str(tmp_path / "mirror"))
    rels = sorted(p.relative_to(corpus).as_posix() for p in corpus.rglob("*.wav"))
    good = tree_sha256({r: sha256_of(corpus / r) for r in rels})
    root, found = DatasetFiles({"clips": {"url": url, "tree_sha256": good}}).folder("clips", suffixes={".wav"})
    assert found == rels and root == mirror_root
    with pytest.raises(ErcDataError, match=f"checksum mismatch over {len(rels)} files"):
        DatasetFiles({"clips": {"url": url, "tree_sha256": "0" * 64}}).folder("clips", suffixes={".wav"})


def small_table(ids, splits=None):
    return canonical.make_table([{"dialogue_id": u, "turn": 0, "utterance_id": u, "speaker": "A",
                                  "split": (splits or {}).get(u, "train")} for u in ids])


def test_media_table_layout_with_segments(tmp_path):
    write_audio(tmp_path / "media" / "long.wav", tone(2.0))
    (tmp_path / "media.csv").write_text("utterance_id,media,start,end\nu1,long.wav,0.0,1.0\nu0,long.wav,,\n")
    items = media_items(small_table(["u0", "u1"]), {"layout": "table", "table": str(tmp_path / "media.csv"),
                                                    "root": str(tmp_path / "media")})
    assert items == [MediaItem(tmp_path / "media" / "long.wav"), MediaItem(tmp_path / "media" / "long.wav", 0.0, 1.0)]
    with pytest.raises(ErcDataError, match=r"media.csv: no media row for 1 utterances \(first: u9\)"):
        media_items(small_table(["u0", "u9"]), {"layout": "table", "table": str(tmp_path / "media.csv")})
    with pytest.raises(ErcDataError, match="params.yaml: unknown media layout 'zip'"):
        media_items(small_table(["u0"]), {"layout": "zip"})


def test_iemocap_release_layout(tmp_path):
    root = tmp_path / "IEMOCAP_full_release"
    sentence = write_audio(root / "Session1/sentences/wav/Ses01F_impro01/Ses01F_impro01_F000.wav", tone(0.5))
    write_audio(root / "Session2/dialog/wav/Ses02M_script01_1.wav", tone(3.0))
    evaluation = root / "Session2/dialog/EmoEvaluation/Ses02M_script01_1.txt"
    evaluation.parent.mkdir(parents=True)
    evaluation.write_text("% header\n\n[1.2500 - 2.0000]\tSes02M_script01_1_M003\tang\t[2.0, 4.0, 4.0]\n")
    items = media_items(small_table(["Ses01F_impro01_F000", "Ses02M_script01_1_M003"]),
                        {"layout": "iemocap_release", "root": str(root)})
    assert items[0] == MediaItem(sentence)
    assert items[1] == MediaItem(root / "Session2/dialog/wav/Ses02M_script01_1.wav", 1.25, 2.0)


def test_meld_release_layout_reads_the_video_clips(tmp_path):
    root = tmp_path / "MELD.Raw"
    for folder, name in [("train/train_splits", "dia0_utt0"), ("dev/dev_splits_complete", "dia3_utt1")]:
        (root / folder).mkdir(parents=True)
        video_with_audio(root / folder / f"{name}.mp4", write_audio(tmp_path / f"{name}.wav", tone(1.0)))
    table = small_table(["train_dia0_utt0", "valid_dia3_utt1", "test_dia1_utt0"],
                        {"valid_dia3_utt1": "valid", "test_dia1_utt0": "test"})
    params = {"featurize": {"encoders": {}, "acoustic": {"egemaps": {"kind": "opensmile", "set": "eGeMAPSv02"}},
                            "on_bad_media": "mask", "media": {"meld": {"layout": "meld_release", "root": str(root)}}}}
    lines = list(featurize_dataset("meld", canonical.Prepared(table, {}, {}), "t", params, tmp_path / "out",
                                   progress=False))
    assert lines[0] == "meld: no text, text encoders skipped"
    assert "1 bad media files masked (first: " in lines[-1] and "output_repeated_splits_test/dia1_utt0.mp4: missing" in lines[-1]
    fs = canonical.load_features(tmp_path / "out", "egemaps")
    assert fs.present.tolist() == [True, True, False] and np.abs(fs.values[:2]).sum(1).min() > 0


def test_visual_features_from_sampled_frames(tmp_path):
    from erc.features.audio import MediaError
    from erc.features.vision import FrameEncoder, sample_frames

    wav = write_audio(tmp_path / "a.wav", tone(1.0))
    black = video_with_audio(tmp_path / "black.mp4", wav)
    moving = video_with_audio(tmp_path / "moving.mp4", wav, source="testsrc=s=32x32:d=1:r=25")
    frames = sample_frames(moving, 4)
    assert len(frames) == 4 and frames[0].shape == (32, 32, 3) and np.abs(frames[0].astype(int) - frames[-1]).max() > 0
    encoder = FrameEncoder(model=str(tiny_image_model(tmp_path / "vit")), frames=4)
    a, b = encoder(black), encoder(moving)
    assert a.shape == b.shape == (32,) == (len(encoder.names),) and np.abs(a - b).max() > 1e-3
    (tmp_path / "junk.mp4").write_bytes(b"\x00junk" * 100)
    with pytest.raises(MediaError, match="junk.mp4: undecodable video"):
        encoder(tmp_path / "junk.mp4")
    table = small_table(["train_dia0_utt0", "train_dia0_utt1"])
    (tmp_path / "train_splits").mkdir()
    os.replace(moving, tmp_path / "train_splits" / "dia0_utt0.mp4")
    params = {"featurize": {"visual": {"vit": {"model": str(tmp_path / "vit"), "frames": 2}}, "on_bad_media": "mask",
                            "media": {"meld": {"layout": "meld_release", "root": str(tmp_path), "sets": [],
                                               "visual": ["vit"]}}}}
    lines = list(featurize_dataset("meld", canonical.Prepared(table, {}, {}), "t", params, tmp_path / "out",
                                   progress=False))
    fs = canonical.load_features(tmp_path / "out", "vit")
    assert fs.modality == "video" and fs.present.tolist() == [True, False] and "meld vit: 2 videos" in lines[-1]


def run(*args, cwd=ROOT):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True)


def test_prepare_featurize_probe_stages_on_a_folder_corpus(tmp_path, corpus):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["datasets"] = {"clips": {"adapter": "folder_labels", "options": OPTIONS, "files": {"clips": {"path": str(corpus)}}}}
    params["featurize"]["media"] = {"clips": {"layout": "folder", "files": "clips", "sets": ["is09", "egemaps"]}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    p = str(tmp_path / "params.yaml")
    done = run("pipelines/prepare.py", "clips", "--out", str(tmp_path / "prepared"), "--params", p)
    assert done.returncode == 0, done.stderr
    done = run("pipelines/featurize.py", "clips", "--prepared", str(tmp_path / "prepared"), "--out",
               str(tmp_path / "features"), "--params", p)
    assert done.returncode == 0, done.stderr
    assert "clips: no text, text encoders skipped" in done.stdout and "clips egemaps: 36 files" in done.stdout
    done = run("pipelines/probe.py", "clips", "--prepared", str(tmp_path / "prepared"), "--features",
               str(tmp_path / "features"), "--out", str(tmp_path / "probe.json"), "--params", p)
    assert done.returncode == 0, done.stderr
    result = json.loads((tmp_path / "probe.json").read_text())
    assert sorted(result["sets"]) == ["egemaps", "is09"] and result["speakers"] == 6
    assert result["sets"]["egemaps"]["accuracy_mean"] > 0.9 and result["sets"]["egemaps"]["chance"] == 0.5


def test_featurize_stage_stops_on_a_bad_clip_and_leaves_nothing(tmp_path):
    corpus = make_corpus(tmp_path / "clips", speakers=3, per_label=1)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["datasets"] = {"clips": {"adapter": "folder_labels", "options": OPTIONS, "files": {"clips": {"path": str(corpus)}}}}
    params["featurize"]["media"] = {"clips": {"layout": "folder", "files": "clips", "sets": ["egemaps"]}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    p = str(tmp_path / "params.yaml")
    assert run("pipelines/prepare.py", "clips", "--out", str(tmp_path / "prepared"), "--params", p).returncode == 0
    (corpus / "Sad" / "M0_s0.wav").write_bytes(b"not a wav at all")
    done = run("pipelines/featurize.py", "clips", "--prepared", str(tmp_path / "prepared"), "--out",
               str(tmp_path / "features"), "--params", p)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1].startswith(f"error: {corpus / 'Sad' / 'M0_s0.wav'}: undecodable audio (")
    assert not (tmp_path / "features").exists() and not list(tmp_path.glob(".features.*"))

"""The CMU Multimodal SDK adapter (erc.data.csd): computational sequences (`.csd`, HDF5) and the SDK's folds.

The real MOSI labels come from the data mirror (ERC_DATA_MIRROR, default ../shared/data; skipped without it);
every other sequence is a tiny file written here with h5py in the SDK's exact layout (its `write_CSD`). Bad input
must end in one line naming the file, before anything is written.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml

from erc.data import build_dataset, canonical, csd, mosi
from erc.errors import ErcDataError

ROOT = Path(__file__).resolve().parent.parent
MIRROR = Path(os.environ.get("ERC_DATA_MIRROR") or ROOT.parent / "shared" / "data").resolve()
MOSI_LABELS = yaml.safe_load((ROOT / "params.yaml").read_text())["datasets"]["mosi"]["files"]["opinion_labels"]
MOSI_LABELS_PATH = MIRROR / MOSI_LABELS["url"].split("githubusercontent.com/", 1)[1]

# The SDK's standard MOSI folds (CMU-MultiComp-Lab/CMU-MultimodalSDK@4f2eadcd7e7b9e20e83b868cdad385b41830285c,
# mmsdk/mmdatasdk/dataset/standard_datasets/CMU_MOSI/cmu_mosi_std_folds.py, MIT): `sdk_folds_file` rewrites that
# file byte for byte (its sha256 below).
MOSI_FOLDS_SHA256 = "027ca94558d1f2ac0b30b7a773f2b65439dc437fa42634c41e1fcf635d56127d"
MOSI_TRAIN = """
    2iD-tVS8NPw 8d-gEyoeBzc Qr1Ca94K55A Ci-AH39fi3Y 8qrpnFRGt2A Bfr499ggo-0 QN9ZIUWUXsY 9T9Hf74oK10 7JsX8y1ysxY
    1iG0909rllw Oz06ZWiO20M BioHAh1qJAQ 9c67fiY0wGQ Iu2PFX3z_1s Nzq88NnDkEk Clx4VXItLTE 9J25DZhivz8 Af8D0E4ZXaw
    TvyZBvOMOTc W8NXH0Djyww 8OtFthrtaJM 0h-zjBukYpk Vj1wYRQjB-o GWuJjcEuzt8 BI97DNYfe5I PZ-lDQFboO8 1DmNV9C1hbY
    OQvJTdtJ2H4 I5y0__X72p0 9qR7uwkblbs G6GlGvlkxAQ 6_0THN4chvY Njd1F0vZSm4 BvYR0L6f2Ig 03bSnISJMiM Dg_0XKD0Mf4
    5W7Z1C_fDaE VbQk4H8hgr0 G-xst2euQUc MLal-t_vJPM BXuRRbG0Ugk LSi-o-IrDMs Jkswaaud0hk 2WGyTLYerpo 6Egk_28TtTM
    Sqr0AcuoNnk POKffnXeBds 73jzhE8R1TQ OtBXNcAL_lE HEsqda8_d0Q VCslbP0mgZI IumbAb8q2dM
""".split()
MOSI_VALID = """
    WKA5OygbEKI c5xsKMxpXnc atnd_PF-Lbs bvLlb-M3UXU bOL9jKpeJRs _dI--eQ6qVU ZAIRrfG22O0 X3j2zQgwYgE aiEXnCPZubE
    ZUXBRvtny7o
""".split()
MOSI_TEST = """
    tmZoasNr4rU zhpQhgha_KU lXPQBPVc5Cw iiK8YX8oH1E tStelxIAHjw nzpVDcQ0ywM etzxEpPuc6I cW1FSBF59ik d6hH302o4v8
    k5Y_838nuGo pLTX3ipuDJI jUzDDGyPkXU f_pcplsH_V0 yvsjCA6Y5Fc nbWiPyCm4g0 rnaNMUZpvvg wMbj6ajWbic cM3Yna7AavY
    yDtzw_Y-7RU vyB00TXsimI dq3Nf_lMPnE phBUpBr1hSo d3_k5Xpfmik v0zCBqDeKcE tIrG4oNLFzE fvVhgmXxadc ob23OKe5a9Q
    cXypl4FnoZo vvZ4IcEtiZc f9O3YtZ2VfI c7UH_rxdZv4
""".split()
EMOTIONS = {"happy": 1, "sad": 2, "anger": 3, "surprise": 4, "disgust": 5, "fear": 6}  # CMU_MOSEI_Labels' columns


# ----------------------------------------------------------------------------------------------- helpers

def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def local(path: Path) -> dict:
    return {"path": str(path), "sha256": sha(path)}


def write_csd(path: Path, name: str, videos: dict[str, tuple[np.ndarray, np.ndarray]]) -> Path:
    """A computational sequence as the SDK's `write_CSD` writes it: `<name>/data/<video>/{features,intervals}` and
    `<name>/metadata/<key>` (a one-element vlen string, JSON)."""
    with h5py.File(path, "w") as f:
        root = f.create_group(name)
        data = root.create_group("data")
        for video, (features, intervals) in videos.items():
            group = data.create_group(video)
            group.create_dataset("features", data=np.asarray(features, dtype=np.float32))
            group.create_dataset("intervals", data=np.asarray(intervals, dtype=np.float64))
        metadata = root.create_group("metadata")
        for key, value in {"root name": name, "computational sequence description": f"{name} for a test",
                           "computational sequence version": "1.0", "alignment compatible": True}.items():
            metadata.create_dataset(key, (1,), dtype=h5py.special_dtype(vlen=str))
            metadata[key][0] = json.dumps(value)
    return path


def sdk_folds_file(path: Path, train, valid, test) -> Path:
    """A folds file as the SDK ships them: three list assignments separated by a blank line."""
    path.write_text(f"standard_train_fold={train!r}\n\nstandard_valid_fold={valid!r}\n\nstandard_test_fold={test!r}\n")
    return path


# A MOSEI-like corpus: 7 label columns (sentiment, then EMOTIONS), 3 segments a video (v2's stored out of order),
# v7 labelled but in no fold; COVAREP-like audio (0.1 s frames, 3 values) and FACET-like video (0.25 s, 2 values).
FOLDS = {"train": ["v1", "v2", "v3"], "valid": ["v4"], "test": ["v5", "v6"]}
SEGMENTS = np.array([[0.0, 1.0], [1.0, 2.5], [3.0, 4.0]])
LABELS = np.array([[-1.5, 2, 0, 0, 0, 0, 0],   # happy
                   [0.0, 0, 0, 0, 0, 0, 0],    # no emotion
                   [2.0, 0, 1, 1, 0, 0, 0]])   # sad and anger tie: sad, listed first


def frames(step: float, end: float) -> np.ndarray:
    starts = np.arange(0, round(end / step)) * step
    return np.stack([starts, starts + step], axis=1)


def make_corpus(folder: Path, *, broken=None) -> dict:
    """The corpus's files in `folder`; `broken(folder)` may change them first. Returns the params entry."""
    folder.mkdir(parents=True, exist_ok=True)
    videos = [f"v{i}" for i in range(1, 8)]
    labels = {v: (LABELS, SEGMENTS) for v in videos}
    labels["v2"] = (LABELS[[2, 0, 1]], SEGMENTS[[2, 0, 1]])
    audio, video = frames(0.1, 4.5), frames(0.25, 4.0)
    write_csd(folder / "CMU_MOSEI_Labels.csd", "All Labels", labels)
    write_csd(folder / "CMU_MOSEI_COVAREP.csd", "COVAREP", {
        v: (np.stack([audio.mean(axis=1), np.full(len(audio), i), np.ones(len(audio))], axis=1), audio)
        for i, v in enumerate(videos, start=1)})
    write_csd(folder / "CMU_MOSEI_VisualFacet42.csd", "FACET 4.2", {
        v: (np.stack([10 * video.mean(axis=1), np.full(len(video), -i)], axis=1), video)
        for i, v in enumerate(videos, start=1)})
    sdk_folds_file(folder / "cmu_mosei_std_folds.py", FOLDS["train"], FOLDS["valid"], FOLDS["test"])
    if broken:
        broken(folder)
    return {"adapter": "csd",
            "files": {"labels": local(folder / "CMU_MOSEI_Labels.csd"),
                      "folds": local(folder / "cmu_mosei_std_folds.py"),
                      "covarep": local(folder / "CMU_MOSEI_COVAREP.csd"),
                      "facet": local(folder / "CMU_MOSEI_VisualFacet42.csd")},
            "options": {"features": {"covarep": "audio", "facet": "video"}}}


def build(entry: dict):
    prepared, dialogues = build_dataset({"datasets": {"mosei": entry}}, "mosei")
    canonical.validate(prepared, where="test", expected_dialogues=dialogues)
    return prepared


def error_of(entry: dict) -> str:
    with pytest.raises(ErcDataError) as e:
        build_dataset({"datasets": {"mosei": entry}}, "mosei")
    message = str(e.value)
    assert "\n" not in message, message
    return message


def edit(name: str, change):
    """A `broken` for make_corpus: `change(h5py file)` applied to the sequence `name`."""
    def broken(folder: Path):
        with h5py.File(folder / name, "a") as f:
            change(f)
    return broken


def run(cwd: Path, *args) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


# ----------------------------------------------------------------------------------------------- the real MOSI labels

@pytest.mark.skipif(not MOSI_LABELS_PATH.is_file(),
                    reason=f"no MOSI labels at {MOSI_LABELS_PATH} (set ERC_DATA_MIRROR)")
def test_real_mosi_labels_split_by_the_sdk_folds(tmp_path, monkeypatch):
    monkeypatch.setenv("ERC_DATA_MIRROR", str(MIRROR))
    folds = sdk_folds_file(tmp_path / "cmu_mosi_std_folds.py", MOSI_TRAIN, MOSI_VALID, MOSI_TEST)
    assert sha(folds) == MOSI_FOLDS_SHA256  # the SDK's file, byte for byte
    entry = {"adapter": "csd", "files": {"labels": MOSI_LABELS, "folds": local(folds)}}
    prepared, _ = build_dataset({"datasets": {"mosi_csd": entry}}, "mosi_csd", cache=tmp_path / "cache")
    t = prepared.table
    # MOSI's standard folds: 52/10/31 videos, 1,284/229/686 segments (the 2,199 of the corpus)
    assert canonical.counts(t) == {
        "train": {"dialogues": 52, "utterances": 1284, "sentiment": {"negative": 552, "positive": 732}},
        "valid": {"dialogues": 10, "utterances": 229, "sentiment": {"negative": 92, "positive": 137}},
        "test": {"dialogues": 31, "utterances": 686, "sentiment": {"negative": 379, "positive": 307}}}
    for split, videos in (("train", MOSI_TRAIN), ("valid", MOSI_VALID), ("test", MOSI_TEST)):
        assert set(t.loc[t["split"] == split, "dialogue_id"]) == set(videos)
    # segment k of a video by start time is `<video>_<k>`, the id (and score) MOSI's own adapter reads
    assert dict(zip(t["utterance_id"], t["sentiment_score"].astype(float))) == pytest.approx(
        mosi.read_scores(MOSI_LABELS_PATH))
    assert t["sentiment_score"].between(-3, 3).all() and ((t["sentiment_score"] >= 0) == (t["sentiment_id"] == 1)).all()

    entry["options"] = {"sentiment": {"classes": "binary_nonzero"}}
    nonzero, dialogues = build_dataset({"datasets": {"mosi_csd": entry}}, "mosi_csd", cache=tmp_path / "cache")
    canonical.validate(nonzero, where="test", expected_dialogues=dialogues)
    left_out = t[~t["utterance_id"].isin(nonzero.table["utterance_id"])]  # the 53/13/30 segments scored 0
    assert (left_out["sentiment_score"] == 0).all()
    assert left_out["split"].value_counts().to_dict() == {"train": 53, "test": 30, "valid": 13}
    assert (nonzero.table["sentiment_score"] != 0).all() and (nonzero.table["sentiment_id"] >= 0).all()


# ----------------------------------------------------------------------------------------------- a generated corpus

def test_segments_are_utterances_in_time_order_split_by_the_folds(tmp_path):
    entry = make_corpus(tmp_path)
    entry["options"]["emotion"] = {"columns": EMOTIONS, "none": "none"}
    prepared = build(entry)
    t = prepared.table
    assert list(t["dialogue_id"].unique()) == ["v1", "v2", "v3", "v4", "v5", "v6"]  # v7 is in no fold
    assert {s: list(t.loc[t["split"] == s, "dialogue_id"].unique()) for s in canonical.SPLITS} == FOLDS
    v2 = t[t["dialogue_id"] == "v2"]
    assert list(v2["utterance_id"]) == ["v2_1", "v2_2", "v2_3"] and list(v2["turn"]) == [0, 1, 2]
    assert list(v2["sentiment_score"]) == [-1.5, 0.0, 2.0]  # stored out of order, read by start time
    assert list(v2["sentiment"]) == ["negative", "positive", "positive"]  # score >= 0 is positive, as erc's MOSI
    assert list(v2["emotion"]) == ["happy", "none", "sad"]
    assert prepared.meta["emotion_labels"] == [*EMOTIONS, "none"]
    assert any("1 labelled videos in no fold left out (first: v7)" in n for n in prepared.meta["notes"])
    # COVAREP-like: mean frame midpoint over [0, 1], [1, 2.5], [3, 4]; frames touching a boundary do not count
    audio = prepared.features["covarep"]
    assert (audio.modality, audio.dim) == ("audio", 3)
    np.testing.assert_allclose(audio.values[3:6], [[0.5, 2, 1], [1.75, 2, 1], [3.5, 2, 1]], atol=1e-5)
    np.testing.assert_allclose(prepared.features["facet"].values[:3, 0], [5, 17.5, 35], atol=1e-4)

    entry["options"].update(target="emotion", sentiment={"classes": "seven"}, emotion={"columns": EMOTIONS})
    seven = build(entry)
    assert list(seven.table["sentiment"][:3]) == ["-2", "0", "2"]  # the SDK's rounding
    assert list(seven.table["emotion"][:3]) == ["happy", "neutral", "sad"] and seven.meta["target"] == "emotion"

    entry["options"].update(target="sentiment", sentiment={"classes": "binary_nonzero"})
    nonzero = build(entry)  # the segments scored 0 are left out; the others keep their ids and features
    v2 = nonzero.table[nonzero.table["dialogue_id"] == "v2"]
    assert list(v2["utterance_id"]) == ["v2_1", "v2_3"] and list(v2["turn"]) == [0, 1]
    np.testing.assert_allclose(nonzero.features["covarep"].values[v2.index, 0], [0.5, 3.5], atol=1e-5)


def sdk_align_mean(segment: np.ndarray, frame_intervals: np.ndarray, features: np.ndarray) -> np.ndarray:
    """The SDK's `mmdataset.__intersect_and_copy` (epsilon 10e-6) and the examples' averaging collapse `myavg`."""
    epsilon = 10e-6
    ref_copy = segment.copy()
    ref_copy[1] = -ref_copy[1]
    ref_copy = ref_copy[::-1]
    sub_copy = frame_intervals.copy()
    sub_copy[:, 0] = -sub_copy[:, 0]
    where = np.all((sub_copy - ref_copy) > (-epsilon), axis=1)
    clipped = np.concatenate([np.maximum(frame_intervals[where, 0], segment[0])[:, None],
                              np.minimum(frame_intervals[where, 1], segment[1])[:, None]], axis=1)
    nonzero = np.abs(clipped[:, 0] - clipped[:, 1]) > epsilon
    return np.average(features[where][nonzero], axis=0)


def test_averaging_is_the_sdk_align_and_overlap_weighting_is_optional():
    rng = np.random.default_rng(0)
    starts = np.cumsum(rng.uniform(0.01, 0.2, size=300))
    frame_intervals = np.stack([starts, starts + rng.uniform(0.01, 0.3, size=300)], axis=1)  # uneven, overlapping
    features = rng.normal(size=(300, 4))
    segments = np.sort(rng.uniform(1, starts[-1] - 1, size=(40, 2)), axis=1)
    weights = csd.segment_weights(frame_intervals, segments, "mean")
    ours = weights @ features / weights.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(ours, [sdk_align_mean(s, frame_intervals, features) for s in segments], atol=1e-12)

    scores = np.array([-3.5, -3, -2.5, -2, -1.5, -1, -0.5, 0, 0.5, 1, 1.5, 2, 2.5, 3])
    sdk_round = [-3 if a < -2 else -2 if a < -1 else -1 if a < 0 else 0 if a == 0 else 1 if a <= 1 else 2 if a <= 2
                 else 3 for a in scores]  # the SDK README's cmumosei_round
    assert list(csd.sentiment_ids(scores, "seven") - 3) == sdk_round

    grid, values = np.array([[0.0, 1], [1, 2], [2, 3]]), np.array([[0.0], [10], [20]])
    segments = np.array([[0.5, 2.25], [1.0, 1.0]])  # a partial overlap each end; a zero-length segment at 1 s
    for average, expected in (("mean", [10, 5]), ("overlap", [(0.5 * 0 + 1 * 10 + 0.25 * 20) / 1.75, 5])):
        w = csd.segment_weights(grid, segments, average)
        np.testing.assert_allclose((w @ values / w.sum(axis=1, keepdims=True))[:, 0], expected)


# ----------------------------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("name, change, fragment", [
    ("CMU_MOSEI_Labels.csd", lambda f: f.__delitem__("All Labels/data"), "group 'All Labels' has no `data` group"),
    ("CMU_MOSEI_Labels.csd", lambda f: (f.__delitem__("All Labels"), f.create_dataset("stray", data=[1])),
     "0 top-level groups []; a computational sequence has one"),
    ("CMU_MOSEI_COVAREP.csd", lambda f: f.__delitem__("COVAREP/data/v3/features"),
     "COVAREP/data/v3 has no `features` dataset"),
    ("CMU_MOSEI_COVAREP.csd", lambda f: f.__delitem__("COVAREP/data/v3/intervals"),
     "COVAREP/data/v3 has no `intervals` dataset"),
    ("CMU_MOSEI_VisualFacet42.csd", lambda f: (f.__delitem__("FACET 4.2/data/v4/intervals"),
                                              f.create_dataset("FACET 4.2/data/v4/intervals", data=frames(0.25, 3.0))),
     "FACET 4.2/data/v4: 16 feature rows but 12 intervals"),
    ("CMU_MOSEI_Labels.csd", lambda f: (f.__delitem__("All Labels/data/v1/features"),
                                       f.create_dataset("All Labels/data/v1/features", data=LABELS[:2])),
     "All Labels/data/v1: 2 feature rows but 3 intervals"),
    ("CMU_MOSEI_VisualFacet42.csd", lambda f: f.__delitem__("FACET 4.2/data/v5"),
     "no video 'v5' (labelled in CMU_MOSEI_Labels.csd, fold test)"),
    ("CMU_MOSEI_COVAREP.csd", lambda f: (f.__delitem__("COVAREP/data/v2"), f.create_group("COVAREP/data/v2"),
                                        f.create_dataset("COVAREP/data/v2/features", data=np.zeros((25, 3))),
                                        f.create_dataset("COVAREP/data/v2/intervals", data=frames(0.1, 2.5))),
     "COVAREP/data/v2: no feature frame overlaps segment v2_3 (3.000-4.000 s)"),
    ("CMU_MOSEI_COVAREP.csd", lambda f: f["COVAREP/data/v6/features"].__setitem__((5, 1), -np.inf),
     "COVAREP/data/v6: 1 NaN/inf feature values in its segments (options.nonfinite: zero reads them as 0)"),
])
def test_a_broken_sequence_is_one_line_naming_the_file(tmp_path, name, change, fragment):
    message = error_of(make_corpus(tmp_path, broken=edit(name, change)))
    assert message.startswith(f"{tmp_path / name}: ") and fragment in message, message


def test_a_dangling_link_is_one_line_naming_the_file(tmp_path):
    def dangle(f):
        f["stray"] = h5py.SoftLink("/nowhere")
    message = error_of(make_corpus(tmp_path, broken=edit("CMU_MOSEI_Labels.csd", dangle)))
    assert message.startswith(f"{tmp_path / 'CMU_MOSEI_Labels.csd'}: unreadable top-level entry"), message


@pytest.mark.parametrize("options, fragment", [
    ({"sentiment": {"column": True}}, "column True is outside the"),
    ({"target": "emotion", "emotion": {"columns": {"happy": 1, "neutral": 2}}}, "name one class twice"),
    ({"target": "emotion", "emotion": {"columns": {"happy": 1, "sad": 2}}, "sentiment": {"classes": "binary_nonzero"}},
     "would drop every segment scored 0"),
])
def test_contradictory_options_are_one_line(tmp_path, options, fragment):
    entry = make_corpus(tmp_path)
    entry["options"].update(options)
    message = error_of(entry)
    assert message.startswith("params.yaml: datasets.mosei.options") and fragment in message, message


def test_nonfinite_features_read_as_zero_when_asked(tmp_path):
    entry = make_corpus(tmp_path, broken=edit("CMU_MOSEI_COVAREP.csd",
                                               lambda f: f["COVAREP/data/v6/features"].__setitem__((5, 1), -np.inf)))
    entry["options"]["nonfinite"] = "zero"
    prepared = build(entry)
    v6 = prepared.table.index[prepared.table["utterance_id"] == "v6_1"][0]
    assert prepared.features["covarep"].values[v6, 1] == pytest.approx(6 * 9 / 10)  # one of 10 frames read as 0
    assert prepared.features["covarep"].info["nonfinite_zeroed"] == 1


def test_a_video_in_two_folds_is_one_line(tmp_path):
    def overlap(folder):
        sdk_folds_file(folder / "cmu_mosei_std_folds.py", ["v1", "v2", "v3"], ["v4"], ["v5", "v6", "v2"])
    message = error_of(make_corpus(tmp_path, broken=overlap))
    assert message == (f"{tmp_path / 'cmu_mosei_std_folds.py'}: video 'v2' is in both standard_train_fold and "
                       "standard_test_fold")
    entry = make_corpus(tmp_path / "lists")
    del entry["files"]["folds"]
    entry["options"]["folds"] = {"train": ["v1", "v2"], "valid": ["v4"], "test": ["v5", "v1"]}
    assert error_of(entry) == ("params.yaml: datasets.mosei.options.folds: video 'v1' is in both folds.train and "
                               "folds.test")
    entry["options"]["folds"]["test"] = ["v5", "v6"]
    assert canonical.counts(build(entry).table)["train"]["dialogues"] == 2  # the lists work as the file does


# ----------------------------------------------------------------------------------------------- check-data, prepare

def test_check_data_and_the_prepare_stage(tmp_path):
    good, bad = tmp_path / "good", tmp_path / "bad"
    entries = {"mosei": make_corpus(good / "data"),
               "broken": make_corpus(bad / "data", broken=edit("CMU_MOSEI_VisualFacet42.csd",
                                                                lambda f: f.__delitem__("FACET 4.2/data/v5")))}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"datasets": entries}))

    check = run(tmp_path, "-m", "erc", "check-data", "mosei", "--params", "params.yaml")
    assert check.returncode == 0, check.stderr
    assert "mosei: 18 utterances in 6 dialogues; target sentiment" in check.stdout
    assert "train: 3 dialogues, 9 utterances" in check.stdout and "test: 2 dialogues, 6 utterances" in check.stdout
    assert "problems: none" in check.stdout

    check = run(tmp_path, "-m", "erc", "check-data", "broken", "--params", "params.yaml")
    assert check.returncode == 1
    assert check.stderr.splitlines() == [
        "broken: 1 problem; nothing was written",
        f"error: {bad / 'data' / 'CMU_MOSEI_VisualFacet42.csd'}: no video 'v5' (labelled in CMU_MOSEI_Labels.csd, "
        "fold test)"]

    prepare = [str(ROOT / "pipelines" / "prepare.py"), "--params", "params.yaml"]
    stage = run(tmp_path, *prepare, "broken", "--out", "out/broken")
    assert stage.returncode == 1 and not (tmp_path / "out" / "broken").exists(), stage.stderr
    stage = run(tmp_path, *prepare, "mosei", "--out", "out/mosei")
    assert stage.returncode == 0, stage.stderr
    prepared = canonical.load(tmp_path / "out" / "mosei")
    t = prepared.table
    assert {s: sorted(t.loc[t["split"] == s, "dialogue_id"].unique()) for s in canonical.SPLITS} == FOLDS
    assert {n: (fs.modality, fs.dim) for n, fs in prepared.features.items()} == {"covarep": ("audio", 3),
                                                                                 "facet": ("video", 2)}
    np.testing.assert_allclose(prepared.features["facet"].values[t["utterance_id"] == "v4_2"], [[17.5, -4]], atol=1e-4)
    assert prepared.meta["sentiment_labels"] == ["negative", "positive"] and prepared.meta["dataset"] == "mosei"

"""The data layer: sources, restricted unpickling, text repair, the MELD and MOSI adapters, the canonical form.

Every fixture is a few rows written into tmp_path; nothing is mocked. Bad input must end in one
ErcDataError line that starts with the offending file, and leave nothing behind in the output.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import pickle
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import yaml

from erc.data import canonical, conversations, mosi, readers
from erc.data.canonical import FeatureSet, Prepared, make_table
from erc.data.text_repair import decode, repair
from erc.errors import ErcDataError
from erc.io import atomic_path
from erc.safe_pickle import load_restricted
from erc.sources import DatasetFiles, FileSpec, fetch, fetch_tree, sha256_of

REPO = Path(__file__).resolve().parent.parent
RAW = "https://raw.githubusercontent.com/"
BASE = "o/r/c"  # owner/repo/commit of every fixture URL
DEAD_PROXY = "http://127.0.0.1:9"  # connection refused at once: a download fails fast and offline
CANONICAL_COLUMNS = ["dialogue_id", "turn", "utterance_id", "speaker", "text", "split", "emotion_id", "emotion",
                     "sentiment_id", "sentiment", "sentiment_score"]


# ----------------------------------------------------------------------------------------------- helpers

def one_line(error: ErcDataError, path) -> str:
    """The error's message, after checking it is one line that starts with `path`."""
    message = str(error)
    assert "\n" not in message, message
    assert message.startswith(f"{path}: "), message
    assert error.path == str(path)
    return message


def files_under(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file()) if directory.exists() else []


def entry(mirror: Path, relpath: str) -> dict:
    """A params-style `{url, sha256}` for the mirror file `<mirror>/o/r/c/<relpath>`."""
    return {"url": f"{RAW}{BASE}/{relpath}", "sha256": sha256_of(mirror / BASE / relpath)}


def write(mirror: Path, relpath: str, data: bytes | str) -> Path:
    path = mirror / BASE / relpath
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """A mirror dir in tmp_path, and any download refused at once."""
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    monkeypatch.setenv("ERC_DATA_MIRROR", str(mirror))
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.setenv(var, DEAD_PROXY)
    for var in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(var, raising=False)
    return mirror


def run_prepare(tmp_path: Path, dataset: str, params_entry: dict, mirror: Path) -> tuple[subprocess.CompletedProcess, Path]:
    """Run the real stage `pipelines/prepare.py` on a temporary params.yaml; returns (result, out dir).

    It runs in tmp_path/work, so its download cache (data/raw) lands there too.
    """
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    params = work / "params.yaml"
    params.write_text(yaml.safe_dump({"datasets": {dataset: params_entry}}))
    out = work / "prepared" / dataset
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("no_proxy", "http_proxy", "https_proxy")}
    env.update(ERC_DATA_MIRROR=str(mirror), http_proxy=DEAD_PROXY, https_proxy=DEAD_PROXY,
               HTTP_PROXY=DEAD_PROXY, HTTPS_PROXY=DEAD_PROXY)
    result = subprocess.run([sys.executable, str(REPO / "pipelines" / "prepare.py"), dataset, "--out", str(out),
                             "--params", str(params)], cwd=work, env=env, capture_output=True, text=True, timeout=120)
    return result, out


def assert_stage_failed(result: subprocess.CompletedProcess, out: Path, path, *fragments: str) -> str:
    """Exit 1, one stderr line `error: <path>: ...` with every fragment, and no output left behind."""
    assert result.returncode == 1, (result.returncode, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: {path}: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert not out.exists()
    assert files_under(out.parent) == [] and (not out.parent.exists() or not any(out.parent.iterdir()))
    return lines[0]


# ----------------------------------------------------------------------------------------------- sources

def test_fetch_reads_the_mirror_and_downloads_nothing(offline, tmp_path):
    path = write(offline, "x.csv", "a,b\n1,2\n")
    cache = tmp_path / "cache"
    got = fetch(FileSpec(f"{RAW}{BASE}/x.csv", hashlib.sha256(b"a,b\n1,2\n").hexdigest()), cache)
    assert got == offline / "o" / "r" / "c" / "x.csv" == path
    assert not cache.exists()


def test_fetch_reads_the_cache_when_no_mirror(monkeypatch, tmp_path):
    monkeypatch.delenv("ERC_DATA_MIRROR", raising=False)
    monkeypatch.setenv("https_proxy", DEAD_PROXY)
    cache = tmp_path / "cache"
    cached = cache / BASE / "x.csv"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"hello")
    assert fetch(FileSpec(f"{RAW}{BASE}/x.csv", hashlib.sha256(b"hello").hexdigest()), cache) == cached


def test_fetch_checksum_mismatch_names_the_file(offline, tmp_path):
    path = write(offline, "x.csv", "a,b\n1,2\n")
    with pytest.raises(ErcDataError) as e:
        fetch(FileSpec(f"{RAW}{BASE}/x.csv", "0" * 64), tmp_path / "cache")
    message = one_line(e.value, path)
    assert "checksum mismatch" in message and "0" * 64 in message


def test_fetch_missing_file_names_the_url_and_leaves_no_partial_file(offline, tmp_path):
    url = f"{RAW}{BASE}/absent/x.csv"
    cache = tmp_path / "cache"
    (cache / BASE / "absent").mkdir(parents=True)  # so a non-atomic download would leave an empty x.csv here
    with pytest.raises(ErcDataError) as e:
        fetch(FileSpec(url, "0" * 64), cache)
    message = one_line(e.value, url)
    assert "missing file" in message and str(offline) in message
    assert files_under(cache) == []


def test_fetch_rejects_a_url_outside_raw_githubusercontent(offline, tmp_path):
    with pytest.raises(ErcDataError) as e:
        fetch(FileSpec("https://example.com/x.csv", "0" * 64), tmp_path / "cache")
    assert "must start with" in one_line(e.value, "https://example.com/x.csv")


def test_fetch_tree_checks_all_files_together(offline, tmp_path):
    contents = {"a.json": b'{"a": 1}', "sub/b.json": b'{"b": 2}'}
    for rel, data in contents.items():
        write(offline, f"tree/{rel}", data)
    # The documented rule, computed here independently: sha256 of "<sha256>  <path>\n", sorted by path.
    lines = "".join(f"{hashlib.sha256(contents[rel]).hexdigest()}  {rel}\n" for rel in sorted(contents))
    tree_hash = hashlib.sha256(lines.encode()).hexdigest()
    url = f"{RAW}{BASE}/tree/"
    got = fetch_tree(url, tree_hash, ["sub/b.json", "a.json"], tmp_path / "cache")
    assert got == {"a.json": offline / BASE / "tree" / "a.json", "sub/b.json": offline / BASE / "tree" / "sub" / "b.json"}

    with pytest.raises(ErcDataError) as e:
        fetch_tree(url, "f" * 64, ["a.json", "sub/b.json"], tmp_path / "cache")
    message = one_line(e.value, url)
    assert "checksum mismatch over 2 files" in message and tree_hash in message


def test_dataset_files_unknown_entry_names_params(offline, tmp_path):
    write(offline, "x.csv", "1\n")
    files = DatasetFiles({"x": entry(offline, "x.csv")}, cache=tmp_path / "cache")
    assert files.path("x") == offline / BASE / "x.csv"
    with pytest.raises(ErcDataError) as e:
        files.path("y")
    assert "'y'" in one_line(e.value, "params.yaml")


# ----------------------------------------------------------------------------------------------- atomic writes

def test_atomic_path_leaves_nothing_on_failure_and_keeps_the_old_target(tmp_path):
    target = tmp_path / "out" / "thing"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.mkdir()
            (tmp / "half.txt").write_text("half")
            raise RuntimeError("boom")
    assert not target.exists() and list((tmp_path / "out").iterdir()) == []

    with atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.mkdir()
            raise RuntimeError("boom")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["thing"]
    assert (target / "old.txt").read_text() == "old"


# ----------------------------------------------------------------------------------------------- safe_pickle

class _Hostile:
    def __init__(self, func, arg):
        self.func, self.arg = func, arg

    def __reduce__(self):
        return (self.func, (self.arg,))


def test_load_restricted_loads_plain_data_at_every_protocol(tmp_path):
    data = {"ids": ["a", "b"], "labels": {"a": [0, 1, 2]}, "pair": (1, 2.5), "none": None, "big": 10 ** 30,
            "set": {1, 2}, "frozen": frozenset({"x"}), "complex": 1 + 2j, "text": "café’"}
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        path = tmp_path / f"p{protocol}.pkl"
        path.write_bytes(pickle.dumps(data, protocol=protocol))
        assert load_restricted(path) == data, protocol


@pytest.mark.parametrize("protocol", [0, 2, pickle.HIGHEST_PROTOCOL])
@pytest.mark.parametrize("via", ["os.system", "builtins.eval"])
def test_load_restricted_refuses_a_hostile_pickle_without_running_it(tmp_path, protocol, via):
    marker = tmp_path / "pwned"
    hostile = (_Hostile(os.system, f"touch {marker}") if via == "os.system"
               else _Hostile(eval, f"open({str(marker)!r}, 'w').close()"))
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps(hostile, protocol=protocol))
    with pytest.raises(ErcDataError) as e:
        load_restricted(path)
    assert "refused global" in one_line(e.value, path)
    assert not marker.exists()
    pickle.loads(path.read_bytes())  # the payload is live: the plain unpickler runs it
    assert marker.exists()


@pytest.mark.parametrize("data", [
    b"", b"not a pickle", pickle.dumps({"a": [1, 2, 3]})[:-5],
    b"\x80\x04\x8e" + (2 ** 62).to_bytes(8, "little") + b"ab",  # absurd length: MemoryError inside pickle
    b"\x80\x04\x95" + (2 ** 63 - 1).to_bytes(8, "little") + b".",  # absurd frame
    b"P1\n.",  # persistent id: pickle's own message spans two lines
], ids=["empty", "garbage", "truncated", "huge-bytes", "huge-frame", "persistent-id"])
def test_load_restricted_corrupt_pickle_is_one_line(tmp_path, data):
    path = tmp_path / "bad.pkl"
    path.write_bytes(data)
    with pytest.raises(ErcDataError) as e:
        load_restricted(path)
    assert "unsafe or corrupt pickle (" in one_line(e.value, path)
    assert "()" not in str(e.value)


def test_load_restricted_missing_file(tmp_path):
    with pytest.raises(ErcDataError) as e:
        load_restricted(tmp_path / "nope.pkl")
    assert "cannot read" in one_line(e.value, tmp_path / "nope.pkl")


# ----------------------------------------------------------------------------------------------- text_repair

def test_decode_reads_stray_cp1252_bytes():
    assert decode(b"don\x92t") == "don\u2019t"
    assert decode("café ".encode() + b"\x93hi\x94") == "café \u201chi\u201d"


@pytest.mark.parametrize("broken", ["don\u0092t", "don\u00e2\u20ac\u2122t"], ids=["c1-control", "mojibake"])
def test_repair_fixes_apostrophes(broken):
    assert repair(broken) == "don\u2019t"


def test_repair_adjacent_mojibake_and_unassigned_cp1252_bytes():
    assert repair("cafÃ©â€¦") == "café…"  # two damaged characters back to back
    assert repair("â€\x9d") == "\u201d"  # 0x9d is unassigned in cp1252, kept as a C1 character


def test_repair_leaves_clean_text_alone():
    for clean in ["café — ok…", "naïve SÃO", "“quoted” – fine", "plain ascii, 100%"]:
        assert repair(clean) == clean


# ----------------------------------------------------------------------------------------------- readers

@pytest.mark.parametrize("name, text, call, fragment", [
    ("a.csv", "x,y\n1,2\n", lambda p: readers.read_csv(p, columns=["x", "z"]), "missing column(s) ['z']; has ['x', 'y']"),
    ("b.csv", "1,2\n3,4\n", lambda p: readers.read_matrix_csv(p, columns=3), "2 columns, expected 3"),
    ("c.csv", "1,2\n3,oops\n", lambda p: readers.read_matrix_csv(p, columns=2), "non-numeric value"),
    ("d.csv", "1,2\n3,inf\n", lambda p: readers.read_matrix_csv(p, columns=2), "1 NaN/inf feature values (first in row 1)"),
    ("e.csv", "", lambda p: readers.read_csv(p), "unreadable CSV"),
    ("f.json", "{not json", readers.read_json, "unreadable JSON"),
], ids=["missing-column", "column-count", "non-numeric", "inf", "empty-csv", "bad-json"])
def test_readers_reject_bad_files(tmp_path, name, text, call, fragment):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ErcDataError) as e:
        call(path)
    assert fragment in one_line(e.value, path)


def test_readers_accept_good_files(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("1,2.5\n3,4\n")
    matrix = readers.read_matrix_csv(path, columns=2)
    assert matrix.dtype == np.float32 and matrix.tolist() == [[1.0, 2.5], [3.0, 4.0]]


# ----------------------------------------------------------------------------------------------- MELD

MELD_HEADER = "Sr No.,Utterance,Speaker,Emotion,Sentiment,Dialogue_ID,Utterance_ID,Season,Episode,StartTime,EndTime\n"
MELD_ROWS = {  # deliberately out of order: dialogue 10 before 2, utterance 1 before 0, a gap (0, 2) in dialogue 2
    "train": [b'1,"Oh, I don\x92t know.",Chandler,Neutral,neutral,10,1,3,5,"00:00:03,000","00:00:04,000"\n',
              b'2,Hi!, Joey ,joy,positive,2,0,3,5,"00:00:01,000","00:00:02,000"\n',
              '3,"What\u00e2\u20ac\u2122s up?",Ross,surprise,positive,10,0,3,5,"00:00:02,000","00:00:03,000"\n'.encode(),
              b'4,No.,Monica,anger,negative,2,2,3,5,"00:00:05,000","00:00:06,000"\n'],
    "dev": [b'1,Scary.,Rachel,fear,negative,0,0,1,1,"00:00:01,000","00:00:02,000"\n',
            b'2,So sad.,Phoebe,sadness,negative,0,1,1,1,"00:00:02,000","00:00:03,000"\n'],
    "test": [b'1,Eww.,Ross,disgust,negative,0,0,2,2,"00:00:01,000","00:00:02,000"\n',
             b'2,Okay.,Joey,neutral,neutral,1,0,2,2,"00:00:01,000","00:00:02,000"\n'],
}


MELD_SPLITS = {"train": "train", "valid": "dev", "test": "test"}  # split -> file stem
MELD_OPTIONS = yaml.safe_load((REPO / "params.yaml").read_text())["datasets"]["meld"]["options"]  # the real entry


def meld_files(mirror: Path, rows: dict | None = None, header: str = MELD_HEADER) -> dict:
    rows = rows or MELD_ROWS
    for stem in MELD_SPLITS.values():
        write(mirror, f"MELD/{stem}_sent_emo.csv", header.encode() + b"".join(rows[stem]))
    return {split: entry(mirror, f"MELD/{stem}_sent_emo.csv") for split, stem in MELD_SPLITS.items()}


def meld_entry(files: dict) -> dict:
    return {"adapter": "conversations", "files": files, "options": MELD_OPTIONS}


def test_meld_build_and_save(offline, tmp_path):
    prep, dialogues = conversations.build(DatasetFiles(meld_files(offline), cache=tmp_path / "cache"), MELD_OPTIONS)
    out = tmp_path / "prepared" / "meld"
    canonical.save(prep, out, expected_dialogues=dialogues)
    t = canonical.load(out).table

    assert list(t.columns) == CANONICAL_COLUMNS
    assert t["utterance_id"].tolist() == ["train_dia2_utt0", "train_dia2_utt2", "train_dia10_utt0", "train_dia10_utt1",
                                          "valid_dia0_utt0", "valid_dia0_utt1", "test_dia0_utt0", "test_dia1_utt0"]
    assert t["split"].tolist() == ["train"] * 4 + ["valid"] * 2 + ["test"] * 2
    assert t["turn"].tolist() == [0, 1, 0, 1, 0, 1, 0, 0]
    assert t["text"].tolist()[:4] == ["Hi!", "No.", "What\u2019s up?", "Oh, I don\u2019t know."]
    assert t["speaker"].tolist()[:4] == ["Joey", "Monica", "Ross", "Chandler"]
    assert t["emotion"].tolist() == ["joy", "anger", "surprise", "neutral", "fear", "sadness", "disgust", "neutral"]
    assert t["emotion_id"].tolist() == [4, 6, 1, 0, 2, 3, 5, 0]
    assert t["sentiment"].tolist()[:4] == ["positive", "negative", "positive", "neutral"]
    assert t["sentiment_score"].isna().all()
    # Dialogue 0 exists in dev and test: distinct canonical ids, each in one split.
    assert t.groupby("dialogue_id")["split"].nunique().max() == 1
    assert sorted(dialogues) == sorted(set(t["dialogue_id"])) and len(dialogues) == 5
    meta = canonical.load(out).meta
    assert meta["counts"]["train"] == {"dialogues": 2, "utterances": 4,
                                       "emotion": {"anger": 1, "joy": 1, "neutral": 1, "surprise": 1},
                                       "sentiment": {"negative": 1, "neutral": 1, "positive": 2}}
    assert meta["sources"]["valid"]["sha256"] == sha256_of(offline / BASE / "MELD" / "dev_sent_emo.csv")


def test_meld_stage_runs(offline, tmp_path):
    result, out = run_prepare(tmp_path, "meld", meld_entry(meld_files(offline)), offline)
    assert result.returncode == 0, result.stderr
    assert (out / "utterances.parquet").is_file() and (out / "meta.json").is_file()
    assert [line.split(":")[0] for line in result.stdout.splitlines()] == ["meld train", "meld valid", "meld test"]


def _drop_emotion(mirror):
    files = meld_files(mirror)
    dev = [row.replace(b",fear,", b",").replace(b",sadness,", b",") for row in MELD_ROWS["dev"]]
    path = write(mirror, "MELD/dev_sent_emo.csv", MELD_HEADER.replace("Emotion,", "").encode() + b"".join(dev))
    files["valid"] = entry(mirror, "MELD/dev_sent_emo.csv")
    return files, path, ["missing column 'Emotion' (options.columns.emotion)"]


def _unknown_label(mirror):
    rows = {**MELD_ROWS, "test": [MELD_ROWS["test"][0].replace(b"disgust", b"happy"), MELD_ROWS["test"][1]]}
    return meld_files(mirror, rows), mirror / BASE / "MELD" / "test_sent_emo.csv", ["row 2, column Emotion: emotion label "
                                                                                    "'happy': it is not one of"]


def _checksum_mismatch(mirror):
    files = meld_files(mirror)
    path = write(mirror, "MELD/train_sent_emo.csv", (mirror / BASE / "MELD" / "train_sent_emo.csv").read_bytes() + b"\n")
    return files, path, ["checksum mismatch", files["train"]["sha256"]]


def _missing_file(mirror):
    files = meld_files(mirror)
    (mirror / BASE / "MELD" / "dev_sent_emo.csv").unlink()
    return files, files["valid"]["url"], ["missing file", "download failed"]


def _malformed_csv(mirror):
    rows = {**MELD_ROWS, "dev": MELD_ROWS["dev"] + [b'3,"never closed,Ross,joy,positive,0,2,1,1,x,y\n']}
    return meld_files(mirror, rows), mirror / BASE / "MELD" / "dev_sent_emo.csv", ["unreadable CSV"]


def _bad_utterance_id(mirror):
    rows = {**MELD_ROWS, "test": [MELD_ROWS["test"][0].replace(b",0,0,2,2,", b",0,x1,2,2,"), MELD_ROWS["test"][1]]}
    return meld_files(mirror, rows), mirror / BASE / "MELD" / "test_sent_emo.csv", ["row 2, column Utterance_ID: turn 'x1' "
                                                                                    "is not a number"]


@pytest.mark.parametrize("make", [_drop_emotion, _unknown_label, _checksum_mismatch, _missing_file, _malformed_csv,
                                  _bad_utterance_id],
                         ids=["missing-column", "unknown-emotion", "checksum-mismatch", "missing-file", "malformed-csv",
                              "non-integer-id"])
def test_meld_stage_bad_input(offline, tmp_path, make):
    files, culprit, fragments = make(offline)
    result, out = run_prepare(tmp_path, "meld", meld_entry(files), offline)
    assert_stage_failed(result, out, culprit, *fragments)
    assert result.stdout == ""
    assert files_under(tmp_path / "work" / "data") == []  # no partial download in the cache either


def test_meld_bad_input_in_process_names_the_file(offline, tmp_path):
    files, culprit, fragments = _unknown_label(offline)
    with pytest.raises(ErcDataError) as e:
        conversations.build(DatasetFiles(files, cache=tmp_path / "cache"), MELD_OPTIONS)
    assert all(f in one_line(e.value, culprit) for f in fragments)


# ----------------------------------------------------------------------------------------------- MOSI

MOSI_SCORES = {"vidA": [-1.5, 0.0, 2.25], "vidB": [0.6, -0.2, -3.0], "vidC": [1.0, -0.4, 0.0]}  # by k = 1, 2, 3
MOSI_STORED = {"vidA": [3, 1, 2], "vidB": [2, 3, 1], "vidC": [1, 3, 2]}  # HDF5 row order, as k (not by start time)
MOSI_TRANSCRIPT_ORDER = ["vidC_2", "vidA_3", "vidB_1", "vidA_1", "vidC_1", "vidB_3", "vidA_2", "vidC_3", "vidB_2"]
MOSI_FEATURE_ORDER = {"train": ["vidB_2", "vidA_1", "vidB_1", "vidA_3", "vidB_3", "vidA_2"],
                      "test": ["vidC_3", "vidC_1", "vidC_2"]}
MOSI_OFFSET = {"text": 0.0, "audio": 0.25, "video": 0.5}


def mosi_code(uid: str) -> float:
    video, k = uid.rsplit("_", 1)
    return 10.0 * (" ABC".index(video[-1])) + int(k)  # vidA_2 -> 12


def mosi_score(uid: str) -> float:
    video, k = uid.rsplit("_", 1)
    return MOSI_SCORES[video][int(k) - 1]


def _csv(rows) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue()


def mosi_files(mirror: Path, nan_in: str | None = None) -> dict:
    d = "bc-LSTM/data"
    row_of = {uid: i for i, uid in enumerate(MOSI_TRANSCRIPT_ORDER)}
    # The shipped binary label agrees with score >= 0 except for vidB_1 (8 of 9).
    label = {uid: int(mosi_score(uid) >= 0) ^ (uid == "vidB_1") for uid in MOSI_TRANSCRIPT_ORDER}
    write(mirror, f"{d}/transcripts.csv", _csv([[uid, f"text of {uid}, ok", " ABC".index(uid[3]), label[uid]]
                                                  for uid in MOSI_TRANSCRIPT_ORDER]))
    for split, uids in MOSI_FEATURE_ORDER.items():
        write(mirror, f"{d}/text_{split}.csv", _csv([[row_of[u]] + [mosi_code(u)] * 100 for u in uids]))
        for modality, dim in mosi.FEATURE_DIMS.items():
            rows = [[mosi_code(u) + MOSI_OFFSET[modality] + j / 1000 for j in range(dim)] + [label[u]] for u in uids]
            if nan_in == f"{modality}_{split}":
                rows[1][5] = "nan"
            write(mirror, f"{d}/{modality}/{modality}_{split}0.csv", _csv(rows))
    h5 = mirror / BASE / "cmumosi" / "CMU_MOSI_Opinion_Labels.csd"
    h5.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(h5, "w") as f:
        data = f.create_group("Opinion Segment Labels").create_group("data")
        for video, ks in MOSI_STORED.items():
            g = data.create_group(video)
            g["features"] = np.array([[MOSI_SCORES[video][k - 1]] for k in ks])
            g["intervals"] = np.array([[2.0 * k, 2.0 * k + 1.5] for k in ks])  # segment k starts at 2k
    files = {"transcripts": entry(mirror, f"{d}/transcripts.csv"),
             "opinion_labels": entry(mirror, "cmumosi/CMU_MOSI_Opinion_Labels.csd")}
    for split in ("train", "test"):
        files[f"text_{split}_index"] = entry(mirror, f"{d}/text_{split}.csv")
        for modality in mosi.FEATURE_DIMS:
            files[f"{modality}_{split}"] = entry(mirror, f"{d}/{modality}/{modality}_{split}0.csv")
    return files


MOSI_OPTIONS = {"valid_fraction": 0.5, "valid_seed": 0}


def test_mosi_build_and_save(offline, tmp_path):
    prep, dialogues = mosi.build(DatasetFiles(mosi_files(offline), cache=tmp_path / "cache"), MOSI_OPTIONS)
    out = tmp_path / "prepared" / "mosi"
    canonical.save(prep, out, expected_dialogues=dialogues)
    loaded = canonical.load(out)
    t = loaded.table

    ids = [f"vid{v}_{k}" for v in "ABC" for k in (1, 2, 3)]
    assert list(t.columns) == CANONICAL_COLUMNS
    assert t["utterance_id"].tolist() == ids
    assert t["dialogue_id"].tolist() == [u[:4] for u in ids] == t["speaker"].tolist()
    assert t["turn"].tolist() == [0, 1, 2] * 3
    assert t["text"].tolist() == [f"text of {u}, ok" for u in ids]
    # Segment k is the k-th by start time, whatever the HDF5 row order.
    np.testing.assert_allclose(t["sentiment_score"].to_numpy(), [mosi_score(u) for u in ids], rtol=1e-6)
    assert t["sentiment_id"].tolist() == [int(mosi_score(u) >= 0) for u in ids]
    assert t["sentiment"].tolist() == [["negative", "positive"][mosi_score(u) >= 0] for u in ids]
    assert (t["emotion_id"] == -1).all() and (t["emotion"] == "").all()
    # One of the two training videos becomes validation: the first by sha256("0:<video>").
    valid = sorted(["vidA", "vidB"], key=lambda v: hashlib.sha256(f"0:{v}".encode()).hexdigest())[0]
    expected_split = {"vidC": "test", valid: "valid", ({"vidA", "vidB"} - {valid}).pop(): "train"}
    assert t["split"].tolist() == [expected_split[u[:4]] for u in ids]

    assert sorted(loaded.features) == ["bclstm_audio", "bclstm_text", "bclstm_video"]
    for modality, dim in {"text": 100, "audio": 73, "video": 100}.items():
        fs = loaded.features[f"bclstm_{modality}"]
        assert fs.modality == modality and fs.values.shape == (9, dim) and fs.values.dtype == np.float32
        # Features follow the table's permutation: row i belongs to utterance ids[i].
        np.testing.assert_allclose(fs.values[:, 0], [mosi_code(u) + MOSI_OFFSET[modality] for u in ids], rtol=1e-6)
        np.testing.assert_allclose(fs.values[:, -1], fs.values[:, 0] + (dim - 1) / 1000, rtol=1e-6)
        assert fs.source == [f"{RAW}{BASE}/bc-LSTM/data/{modality}/{modality}_{s}0.csv" for s in ("train", "test")]
    assert any("agree with score >= 0 on 0.8889" in note for note in loaded.meta["notes"])


def test_mosi_nan_feature_stage_fails_naming_the_file(offline, tmp_path):
    files = mosi_files(offline, nan_in="audio_train")
    result, out = run_prepare(tmp_path, "mosi", {"adapter": "mosi", "options": MOSI_OPTIONS, "files": files}, offline)
    line = assert_stage_failed(result, out, offline / BASE / "bc-LSTM/data/audio/audio_train0.csv", "NaN", "row 1")
    assert "1 NaN/inf feature values" in line


def test_mosi_nan_feature_in_process(offline, tmp_path):
    files = mosi_files(offline, nan_in="video_test")
    with pytest.raises(ErcDataError) as e:
        mosi.build(DatasetFiles(files, cache=tmp_path / "cache"), MOSI_OPTIONS)
    assert "NaN" in one_line(e.value, offline / BASE / "bc-LSTM/data/video/video_test0.csv")


def test_mosi_not_hdf5_names_the_label_file(offline, tmp_path):
    files = mosi_files(offline)
    path = write(offline, "cmumosi/CMU_MOSI_Opinion_Labels.csd", b"not hdf5")
    files["opinion_labels"] = entry(offline, "cmumosi/CMU_MOSI_Opinion_Labels.csd")
    with pytest.raises(ErcDataError) as e:
        mosi.build(DatasetFiles(files, cache=tmp_path / "cache"), MOSI_OPTIONS)
    assert "not a MOSI opinion-label computational sequence" in one_line(e.value, path)


# ----------------------------------------------------------------------------------------------- canonical

def small_prep(**feature_overrides) -> Prepared:
    table = make_table([
        {"dialogue_id": "d1", "turn": 0, "utterance_id": "u0", "speaker": "A", "text": "hi", "split": "train",
         "emotion_id": 0, "emotion": "calm", "sentiment_score": 0.5},
        {"dialogue_id": "d1", "turn": 1, "utterance_id": "u1", "speaker": "B", "text": "yo", "split": "train",
         "emotion_id": 1, "emotion": "angry"},
        {"dialogue_id": "d2", "turn": 0, "utterance_id": "u2", "speaker": "A", "text": "bye", "split": "test",
         "emotion_id": 0, "emotion": "calm", "sentiment_score": -1.0},
    ])
    fs = FeatureSet("f", "audio", np.arange(6, dtype=np.float32).reshape(3, 2), ["src/f.csv"])
    for k, v in feature_overrides.items():
        setattr(fs, k, v)
    return Prepared(table, {"emotion_labels": ["calm", "angry"], "sentiment_labels": []}, {"f": fs})


def test_small_prep_is_valid():
    prep = small_prep()
    canonical.validate(prep, where="OUT", expected_dialogues=["d1", "d2"])
    assert list(prep.table.columns) == CANONICAL_COLUMNS
    assert prep.table["sentiment_id"].tolist() == [-1, -1, -1] and prep.table["sentiment_score"].isna().tolist() == [False, True, False]


def _set(prep, row, **values):
    for col, value in values.items():
        prep.table.loc[row, col] = value
    return prep


@pytest.mark.parametrize("breaks, where, fragment", [
    (lambda: (_set(small_prep(), 1, split="valid"), None), "OUT", "dialogue d1 is in more than one split"),
    (lambda: (_set(small_prep(), 2, utterance_id="u0"), None), "OUT", "1 duplicate utterance ids (first: u0)"),
    (lambda: (_set(small_prep(), 1, emotion_id=2, emotion="sad"), None), "OUT",
     "emotion label 'sad' (id 2) of u1 is outside the label set ['calm', 'angry']"),
    (lambda: (_set(small_prep(), 1, emotion="calm"), None), "OUT", "emotion names disagree with emotion ids"),
    (lambda: (_set(small_prep(), 1, sentiment_id=1, sentiment="pos"), None), "OUT",
     "sentiment ids present but the dataset declares no sentiment labels"),
    (lambda: (_set(small_prep(), 1, turn=2), None), "OUT", "dialogue d1: turns are not 0..1 in table order"),
    (lambda: (_set(small_prep(), 2, split="dev"), None), "OUT", "unknown split names ['dev']"),
    (lambda: (small_prep(), ["d1", "d2", "d3"]), "OUT", "1 empty dialogues (first: d3)"),
    (lambda: (small_prep(values=np.array([[0, 1], [np.nan, 3], [4, 5]], dtype=np.float32)), None), "src/f.csv",
     "1 NaN/inf feature values (first in row 1)"),
    (lambda: (small_prep(values=np.array([[0, 1], [2, 3], [4, 1e39]])), None), "src/f.csv",  # inf once float32
     "1 NaN/inf feature values (first in row 2)"),
    (lambda: (small_prep(values=np.zeros((4, 2), dtype=np.float32)), None), "src/f.csv", "4 feature rows for 3 utterances"),
    (lambda: (small_prep(present=np.ones(2, dtype=bool)), None), "src/f.csv", "presence mask has shape (2,)"),
    (lambda: (small_prep(modality="smell"), None), "src/f.csv", "unknown modality 'smell'"),
], ids=["two-splits", "duplicate-ids", "emotion-outside", "names-vs-ids", "undeclared-sentiment", "turn-order",
        "unknown-split", "empty-dialogue", "nan-feature", "float32-overflow", "feature-rows", "mask-shape", "modality"])
def test_validate_rejects(tmp_path, breaks, where, fragment):
    prep, expected = breaks()
    with pytest.raises(ErcDataError) as e:
        canonical.validate(prep, where="OUT", expected_dialogues=expected)
    assert fragment in one_line(e.value, where)
    out = tmp_path / "prepared" / "x"
    with pytest.raises(ErcDataError):
        canonical.save(prep, out, expected_dialogues=expected)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_validate_rejects_an_empty_table():
    prep = small_prep()
    prep.table = prep.table.iloc[:0]
    prep.features = {}
    with pytest.raises(ErcDataError) as e:
        canonical.validate(prep, where="OUT")
    assert "no utterances" in one_line(e.value, "OUT")


def test_make_table_requires_the_key_columns():
    with pytest.raises(ValueError, match="lacks columns"):
        make_table([{"dialogue_id": "d", "utterance_id": "u"}])


def test_save_load_round_trip_with_presence_mask(tmp_path):
    prep = small_prep()
    present = np.array([True, False, True])
    prep.features["acoustic"] = FeatureSet("acoustic", "audio", np.array([[1, 2, 3], [0, 0, 0], [4, 5, 6]], np.float32),
                                           ["src/a.csv"], present, {"columns": ["x", "y", "z"]})
    out = tmp_path / "prepared" / "tiny"
    canonical.save(prep, out, expected_dialogues=["d1", "d2"])
    assert (out / "features" / "acoustic.present.npy").is_file()
    assert not (out / "features" / "f.present.npy").exists()
    assert sorted(p.name for p in out.parent.iterdir()) == ["tiny"]  # no temporary left beside it

    loaded = canonical.load(out)
    pd.testing.assert_frame_equal(loaded.table, prep.table)
    assert loaded.emotion_labels == ["calm", "angry"] and loaded.sentiment_labels == []
    assert sorted(loaded.features) == ["acoustic", "f"]
    a = loaded.features["acoustic"]
    np.testing.assert_array_equal(a.values, prep.features["acoustic"].values)
    np.testing.assert_array_equal(a.present, present)
    assert a.present.dtype == bool and a.values.dtype == np.float32
    assert (a.modality, a.source, a.info) == ("audio", ["src/a.csv"], {"columns": ["x", "y", "z"]})
    assert loaded.features["f"].present is None
    np.testing.assert_array_equal(loaded.features["f"].values, prep.features["f"].values)
    assert loaded.meta["features"]["acoustic"] == {"modality": "audio", "dim": 3, "rows": 3, "source": ["src/a.csv"],
                                                   "missing": 1, "columns": ["x", "y", "z"]}
    assert loaded.meta["counts"]["train"] == {"dialogues": 1, "utterances": 2, "emotion": {"angry": 1, "calm": 1}}
    assert loaded.meta["counts"]["valid"] == {"dialogues": 0, "utterances": 0}

    # Feature sets from another directory, picked by name; a row-count mismatch there names its file.
    extra = tmp_path / "features"
    canonical.save_features(extra, FeatureSet("emb", "text", np.ones((3, 4), np.float32), ["model"]))
    picked = canonical.load(out, extra_feature_dirs=[extra], feature_names=["emb", "acoustic"])
    assert list(picked.features) == ["emb", "acoustic"] and picked.features["emb"].dim == 4
    canonical.save_features(extra, FeatureSet("short", "text", np.ones((2, 4), np.float32), ["model"]))
    with pytest.raises(ErcDataError) as e:
        canonical.load(out, extra_feature_dirs=[extra], feature_names=["short"])
    assert "2 rows for 3 utterances" in one_line(e.value, extra / "short.npy")
    with pytest.raises(ErcDataError) as e:
        canonical.load(out, feature_names=["nope"])
    assert "feature set 'nope' not found" in one_line(e.value, out)


def test_save_replaces_an_existing_dataset_whole(tmp_path):
    out = tmp_path / "prepared" / "tiny"
    canonical.save(small_prep(), out)
    assert (out / "features" / "f.npy").is_file()
    prep = small_prep()
    prep.features = {}
    canonical.save(prep, out)
    assert not (out / "features").exists()
    assert canonical.load(out).features == {}
    assert sorted(p.name for p in out.parent.iterdir()) == ["tiny"]


def test_load_missing_dataset_says_run_prepare(tmp_path):
    with pytest.raises(ErcDataError) as e:
        canonical.load(tmp_path / "nothing")
    assert "run the prepare stage first" in one_line(e.value, tmp_path / "nothing" / "utterances.parquet")

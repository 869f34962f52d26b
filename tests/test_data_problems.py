"""Data problems found where they are cheap to fix, each one line naming the file (issue 27, items 3, 6, 11, 12a).

- a corpus that builds but cannot be trained on (an empty split, a split without target labels) stops
  `erc check-data` and the prepare stage, saying what to change; check-data warns of a label train lacks;
- training checks the contents it will read (the table's integrity, each feature matrix's shape from its header,
  NaN/inf) before an MLflow run exists;
- silence is judged by the loudest 25 ms, so quiet speech padded with silence passes;
- a UTF-16 CSV is said to be UTF-16, not reported as missing columns.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from erc.data import build_dataset, conversations
from erc.errors import ErcDataError
from erc.features.audio import MediaError, load_audio
from erc.sources import DatasetFiles
from tests.fixtures import INPUTS, make_prepared
from tests.media_fixtures import SR, espeak, tone, write_audio

ROOT = Path(__file__).resolve().parent.parent
COLUMNS = {"dialogue": "dia", "turn": "t", "speaker": "who", "text": "text", "emotion": "emo"}
HEADER = "dia,t,who,text,emo\n"


def one_line(error: Exception, path, fragment: str) -> str:
    message = str(error)
    assert "\n" not in message and message.startswith(f"{path}: "), message
    assert fragment in message, message
    return message


def corpus(tmp_path: Path, **files: str | bytes) -> dict:
    """`<split>_<ext>=content` files written into tmp_path; their params `files` entries (path and sha256)."""
    entries = {}
    for name, content in files.items():
        split, ext = name.split("_", 1)
        path = tmp_path / f"{split}.{ext}"
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        entries[split] = {"path": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    return entries


def run(cwd: Path, *args, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
                          check=False)


# ----------------------------------------------------------------------------------------------- item 3: splits


def test_check_data_and_prepare_refuse_an_empty_validation_split(tmp_path):
    """The issue's corpus: train and test files of one row each; the 15% carve-out takes no dialogue."""
    files = corpus(tmp_path, train_csv=HEADER + "1,0,Ann,Hello,joy\n", test_csv=HEADER + "2,0,Bob,Bye,joy\n")
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"datasets": {"talk": {"adapter": "conversations", "files": files,
                                                            "options": {"columns": COLUMNS}}}}))
    check = run(tmp_path, "-m", "erc", "check-data", "talk", "--params", str(params))
    assert check.returncode == 1 and "problems: none" not in check.stdout, check.stdout
    lines = check.stderr.splitlines()
    assert lines[0] == "talk: 1 problem; nothing was written", check.stderr
    assert lines[1].startswith(f"error: {params}: datasets.talk: the valid split holds no dialogue (train 1, valid 0, "
                               "test 1 dialogues)"), lines[1]
    assert "options.valid_from_train.fraction" in lines[1], lines[1]  # what to change

    stage = run(tmp_path, str(ROOT / "pipelines" / "prepare.py"), "talk", "--out", "out/talk", "--params", str(params))
    assert stage.returncode == 1 and stage.stderr.splitlines() == [lines[1]], stage.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*"))


def test_an_emptied_training_split_is_one_line_naming_the_params_entry(tmp_path):
    """The carve-out takes the only training dialogue: nothing is left to train on."""
    files = corpus(tmp_path, train_csv=HEADER + "1,0,A,x,joy\n", test_csv=HEADER + "9,0,Bob,Bye,joy\n")
    params = {"datasets": {"talk": {"adapter": "conversations", "files": files,
                                    "options": {"columns": COLUMNS, "valid_from_train": {"fraction": 0.9}}}}}
    with pytest.raises(ErcDataError) as e:
        build_dataset(params, "talk", source="p.yaml")
    message = one_line(e.value, "p.yaml", "datasets.talk: the train split holds no dialogue (train 0, valid 1, test 1 "
                                          "dialogues): add dialogues")
    assert "options.valid_from_train.fraction" in message


def test_a_split_without_target_labels_is_a_problem():
    from erc.data.canonical import make_table, split_problem

    rows = [{"dialogue_id": d, "turn": 0, "utterance_id": d, "speaker": "A", "text": "x", "split": s,
             "emotion_id": 0, "emotion": "joy"} for d, s in (("1", "train"), ("2", "valid"), ("3", "test"))]
    assert split_problem(make_table(rows), "emotion") is None
    assert split_problem(make_table(rows), "sentiment") == ("no utterance of the train and valid and test split has a "
                                                            "sentiment label (the target task)")


def test_check_data_warns_of_a_label_that_only_valid_or_test_hold(tmp_path, capsys):
    from erc.data import check

    files = corpus(tmp_path, train_csv=HEADER + "1,0,A,x,joy\n1,1,B,y,anger\n", valid_csv=HEADER + "2,0,A,z,fear\n",
                   test_csv=HEADER + "3,0,A,w,joy\n")
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"datasets": {"talk": {"adapter": "conversations", "files": files, "options": {
        "columns": COLUMNS, "labels": {"emotion": ["anger", "joy", "fear"]}}}}}))
    assert check.main(["talk", "--params", str(params)]) == 0
    out = capsys.readouterr().out
    assert ("warning: emotion label 'fear' in valid or test but in no training utterance: the model never learns it "
            "(add training dialogues with it)") in out.splitlines(), out


# ----------------------------------------------------------------------------------------------- item 6: contents


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A params file whose dataset `tiny` is under its data_dir (each test writes the prepared dataset)."""
    tmp = tmp_path_factory.mktemp("contents")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data_dir"] = str(tmp / "data")
    params["inputs"]["tiny"] = dict(INPUTS)
    params["train"].update(storage_path=str(tmp / "ray_results"), epochs=1, seeds=[0])
    (tmp / "params.yaml").write_text(yaml.safe_dump(params))
    return tmp


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _rewrite(path: Path, change) -> None:
    np.save(path, change(np.load(path)))


def _nan_in_row_5(values):
    values[5, 3] = np.nan
    return values


@pytest.mark.parametrize("breaks, culprit, fragment", [
    (lambda d: _truncate(d / "utterances.parquet"), "utterances.parquet", "unreadable parquet"),
    (lambda d: _rewrite(d / "features" / "text16.npy", lambda v: v[:, :15]), "features/text16.npy",
     "wrong feature dim: 15, expected 16"),
    (lambda d: _rewrite(d / "features" / "text16.npy", lambda v: v[:-1]), "features/text16.npy",
     "54 feature rows for 55 utterances"),
    (lambda d: _rewrite(d / "features" / "audio8.npy", _nan_in_row_5), "features/audio8.npy",
     "1 NaN/inf feature values (first in row 5)"),
], ids=["truncated-parquet", "wrong-width", "wrong-rows", "nan"])
def test_train_checks_the_contents_before_any_run_exists(project, tmp_path, breaks, culprit, fragment):
    prepared = make_prepared(project / "data" / "prepared" / "tiny", kind="emotion")
    breaks(prepared)
    store = tmp_path / "mlflow.db"
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{store}", "RAY_TMPDIR": str(tmp_path / "ray_tmp")}
    result = run(ROOT, "pipelines/train.py", "--dataset", "tiny", "--model", "baseline", "--out",
                 str(tmp_path / "out.json"), "--params", str(project / "params.yaml"), env=env)
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines == [lines[0]], result.stderr  # one line: no traceback, no Ray start
    assert lines[0].startswith(f"error: {prepared / culprit}: {fragment}"), lines[0]
    assert not store.exists()  # no MLflow store, so no run in it
    assert not (tmp_path / "ray_tmp").exists() and not (tmp_path / "out.json").exists()


# ----------------------------------------------------------------------------------------------- item 11: silence


def rms_dbfs(wave: np.ndarray) -> float:
    rms = float(np.sqrt(np.mean(np.square(wave, dtype=np.float64))))
    return 20 * np.log10(rms) if rms > 0 else -np.inf


def quiet_speech(tmp_path: Path) -> np.ndarray:
    """Speech (espeak-ng, else a voiced-like tone) peaking at -40 dBFS, as the issue's calm clip."""
    spoken = espeak(tmp_path / "spoken.wav", "kids are talking by the door")
    wave = load_audio(spoken) if spoken is not None else tone(0.6)  # espeak's 22 kHz read as 16 kHz mono
    return (wave * (10 ** (-40 / 20) / np.abs(wave).max())).astype(np.float32)


def test_quiet_speech_padded_with_silence_is_not_silent(tmp_path):
    speech = quiet_speech(tmp_path)
    pad = np.zeros(SR, np.float32)
    wave = np.concatenate([pad, speech, pad])
    while rms_dbfs(wave) > -63:  # the whole clip's RMS well under the -60 threshold
        wave = np.concatenate([wave, pad])
    path = write_audio(tmp_path / "calm.wav", wave, subtype="FLOAT")
    loaded = load_audio(path)
    assert len(loaded) == len(wave) and np.abs(loaded).max() > 0.005


@pytest.mark.parametrize("kind, level", [("zeros", "-inf"), ("noise", "-7")])  # noise: -77 or so
def test_silent_and_near_silent_files_still_fail(tmp_path, kind, level):
    wave = (np.zeros(3 * SR) if kind == "zeros"
            else 10 ** (-78 / 20) * np.random.default_rng(0).normal(size=3 * SR)).astype(np.float32)  # RMS -78 dBFS
    path = write_audio(tmp_path / f"{kind}.wav", wave, subtype="FLOAT")
    with pytest.raises(MediaError) as e:
        load_audio(path)
    message = one_line(e.value, path, f"silent audio (RMS {level}")
    assert "in its loudest 25 ms, threshold -60)" in message


# ----------------------------------------------------------------------------------------------- item 12a: encoding


@pytest.mark.parametrize("encoding, said", [
    ("utf-16", "UTF-16 (little-endian)"),  # as Python and Excel's "Unicode text" write it: with a byte-order mark
    ("utf-16-be", "UTF-16 or UTF-32 without a byte-order mark"),
    ("utf-32", "UTF-32"),
])
def test_a_utf16_csv_is_said_to_be_utf16(tmp_path, encoding, said):
    text = HEADER + "1,0,Ann,Hello,joy\n2,0,Bob,Bye,joy\n"
    files = corpus(tmp_path, train_csv=text.encode(encoding), test_csv=HEADER + "3,0,Cy,Hi,joy\n")
    with pytest.raises(ErcDataError) as e:
        conversations.build(DatasetFiles(files), {"columns": COLUMNS})
    message = one_line(e.value, files["train"]["path"], f"not UTF-8 text ({said}")
    assert "missing column" not in message and "save it as UTF-8" in message

"""`erc predict` bounded for any input (issue 34): the terminal's table one line per utterance within the width
whatever the longest text, full texts and probabilities only in --out / --json (streamed, round-tripping), one
stderr line when texts were cut for the encoder, a progress line for large inputs. A real local training run of the
baseline on text from a tiny random BERT (max_length 16) saved to a folder, in a real sqlite MLflow store."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import erc.serving.predict as serving
from erc.data import canonical
from erc.features.text import encode_texts, load_encoder
from erc.serving.predict import main, predict
from erc.training.config import TrainConfig
from erc.training.driver import run
from tests.fixtures import EMOTIONS
from tests.media_fixtures import tiny_text_model

MAX_LENGTH = 16  # tokens, [CLS] and [SEP] included: "hello" is one token of MiniLM's vocabulary
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def trained(ray_session, tiny_emotion, tmp_path_factory):
    """The baseline on text alone, whose feature set is a tiny random BERT with max_length 16, one epoch."""
    root = tmp_path_factory.mktemp("predict_bounded")
    spec = {"model": str(tiny_text_model("bert", root / "bert")), "pooling": "mean", "max_length": MAX_LENGTH}
    encoder = load_encoder(spec["model"])
    table = canonical.load(tiny_emotion, feature_names=[]).table
    values, _ = encode_texts(table["text"].tolist(), *encoder, max_length=MAX_LENGTH, progress=False)
    canonical.save_features(root / "features", canonical.FeatureSet("tinybert", "text", values, ["tiny"], None, spec))
    uri = f"sqlite:///{root / 'mlflow.db'}"
    cfg = TrainConfig(dataset="tiny", prepared=str(tiny_emotion), feature_dirs=[str(root / "features")],
                      inputs={"text": "tinybert"}, model="baseline", model_config={"hidden": 8}, epochs=1,
                      batch_size=4, storage_path=str(root / "ray"), tracking_uri=uri, experiment="erc-predict-bounded")
    return {"uri": uri, "run_id": run(cfg)["run_id"], "encoder": encoder}


LONG = ("a transcript\tpasted into one cell\n" * 30_000)  # ~1 MB, tabs and newlines inside


def conversation(path, *, rows=300, long_at=7, texts=None):
    """`rows` utterances in dialogues of 6 turns, the one at `long_at` a 1 MB text (or the given `texts`)."""
    words = ["hello", "great", "awful", "fine", "okay", "sad", "what"]
    texts = texts or [LONG if i == long_at else " ".join(words[(i + k) % 7] for k in range(i % 5 + 1))
                      for i in range(rows)]
    frame = pd.DataFrame({"dialogue_id": [f"d{i // 6}" for i in range(len(texts))],
                          "speaker": ["A" if i % 2 else "B" for i in range(len(texts))], "text": texts})
    frame.to_csv(path, index=False)
    return path


def predict_main(trained, path, *extra):
    main([str(path), "--model", trained["run_id"], "--tracking-uri", trained["uri"], *extra])


def test_table_fits_the_width_one_line_per_utterance_whatever_the_longest_text(trained, tmp_path):
    path = conversation(tmp_path / "conv.csv")
    done = subprocess.run([sys.executable, "-m", "erc.cli", "predict", str(path), "--model", trained["run_id"],
                           "--tracking-uri", trained["uri"]], capture_output=True, text=True, timeout=300, cwd=ROOT,
                          check=False, env={**os.environ, "COLUMNS": "80", "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert len(lines) == 1 + 300, len(lines)  # a header and one line per utterance
    assert max(len(line) for line in lines) <= 80
    assert lines[0].split()[:3] == ["dialogue_id", "speaker", "text"]
    assert lines[1 + 7].split()[:4] == ["d1", "A", "a", "transcript"] and "…" in lines[1 + 7]
    assert all(line.split()[-2] in EMOTIONS for line in lines[1:])  # the emotion and its probability stay readable
    assert len(done.stdout) < 301 * 81


@pytest.mark.parametrize("suffix", [".csv", ".json", ".jsonl"])
def test_out_keeps_full_texts_and_probabilities_and_round_trips(trained, tmp_path, suffix):
    path = conversation(tmp_path / "conv.csv", rows=40, long_at=3)
    texts = pd.read_csv(path, dtype=str, keep_default_na=False)["text"].tolist()
    expected = predict(path, trained["run_id"], tracking_uri=trained["uri"], encoder=trained["encoder"])
    out = tmp_path / f"p{suffix}"
    predict_main(trained, path, "--out", str(out))
    if suffix == ".csv":
        back = pd.read_csv(out, dtype={"text": str, "speaker": str, "dialogue_id": str}, keep_default_na=False)
        probs = back[[f"p_{e}" for e in EMOTIONS]].to_numpy()
    else:
        records = (json.loads(out.read_text()) if suffix == ".json"
                   else [json.loads(line) for line in out.read_text().splitlines()])
        back = pd.DataFrame(records)
        probs = np.array([[r["probabilities"][e] for e in EMOTIONS] for r in records])
    assert back["text"].tolist() == texts and back["text"][3] == LONG  # whole, newlines and tabs included
    assert back["speaker"].tolist() == expected["speaker"].tolist()
    assert back["emotion"].tolist() == expected["emotion"].tolist()
    np.testing.assert_allclose(probs, expected[[f"p_{e}" for e in EMOTIONS]].to_numpy(), atol=2e-6)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["conv.csv", out.name])  # no temporary left


def test_json_to_stdout_is_the_same_array(trained, tmp_path, capsys):
    path = conversation(tmp_path / "conv.csv", rows=20, long_at=2)
    predict_main(trained, path, "--out", str(tmp_path / "p.json"))
    predict_main(trained, path, "--json")
    assert json.loads(capsys.readouterr().out) == json.loads((tmp_path / "p.json").read_text())


def test_a_failure_midway_leaves_no_output(trained, tmp_path, monkeypatch):
    path = conversation(tmp_path / "conv.csv", rows=40)
    monkeypatch.setattr(serving, "BATCH_UTTERANCES", 12)  # dialogues of 6: parts of two
    calls = []
    real = serving.infer

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("disk gone")
        return real(*args, **kwargs)

    monkeypatch.setattr(serving, "infer", failing)
    with pytest.raises(RuntimeError, match="disk gone"):
        predict_main(trained, path, "--out", str(tmp_path / "p.jsonl"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["conv.csv"]


def test_parts_of_whole_dialogues_give_the_same_predictions(trained, tmp_path, monkeypatch):
    path = conversation(tmp_path / "conv.csv", rows=40)
    whole = predict(path, trained["run_id"], tracking_uri=trained["uri"], encoder=trained["encoder"])
    monkeypatch.setattr(serving, "BATCH_UTTERANCES", 5)  # every dialogue (6 turns) a part of its own
    assert len(serving.parts(pd.read_csv(path, dtype=str))) == 7
    parted = predict(path, trained["run_id"], tracking_uri=trained["uri"], encoder=trained["encoder"])
    pd.testing.assert_frame_equal(whole, parted, atol=1e-6)


def test_truncation_line_exactly_when_a_text_exceeds_the_encoder_limit(trained, tmp_path, capsys):
    fits = " ".join(["hello"] * (MAX_LENGTH - 2))  # with [CLS] and [SEP]: exactly the limit
    over = fits + " hello"
    tokenizer = trained["encoder"][0]
    assert [len(tokenizer(t)["input_ids"]) for t in (fits, over)] == [MAX_LENGTH, MAX_LENGTH + 1]
    cases = {"none": [fits, "fine", fits], "one": [fits, over, "fine"], "two": [over, "fine", LONG]}
    seen = {}
    for case, texts in cases.items():
        path = conversation(tmp_path / f"{case}.csv", texts=texts)
        predict_main(trained, path, "--out", str(tmp_path / f"{case}.jsonl"))
        seen[case] = [line for line in capsys.readouterr().err.splitlines() if "truncated" in line]
    assert seen["none"] == []
    assert seen["one"] == [(f"note: {tmp_path / 'one.csv'}: 1 text longer than the encoder's {MAX_LENGTH} tokens "
                            f"was truncated for text:tinybert")]
    assert seen["two"] == [(f"note: {tmp_path / 'two.csv'}: 2 texts longer than the encoder's {MAX_LENGTH} tokens "
                            f"were truncated for text:tinybert")]


def test_progress_line_for_large_inputs(trained, tmp_path, capsys, monkeypatch):
    path = conversation(tmp_path / "conv.csv", rows=30, long_at=-1)
    predict_main(trained, path, "--out", str(tmp_path / "p.csv"))
    assert "utterances" not in capsys.readouterr().err  # small: silent
    monkeypatch.setattr(serving, "PROGRESS_UTTERANCES", 30)  # as large as the default counts large
    monkeypatch.setattr(serving, "PROGRESS_EVERY_SECONDS", 0.0)
    monkeypatch.setattr(serving, "BATCH_UTTERANCES", 12)
    predict_main(trained, path, "--out", str(tmp_path / "p.csv"))
    progress = [line for line in capsys.readouterr().err.splitlines() if line.startswith("predict: conv.csv: ")]
    assert [line.split()[2] for line in progress] == ["12/30", "24/30", "30/30"], progress
    assert progress[-1].startswith("predict: conv.csv: 30/30 utterances in ")
    predict_main(trained, path, "--json", "--no-progress")
    assert "utterances" not in capsys.readouterr().err

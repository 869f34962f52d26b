"""Must show 2 of issue 29: a model of MELD's leaderboard kind (MiSTER-E on text + VoiceERC's prosody8) predicts a
two-speaker conversation given as one wav and a segment table, and hears it.

The model is trained here by erc's training code (local mode, two epochs) on the tiny emotion dataset, its audio a
`prosody8` set made by erc.data.voiceerc's own code from generated VoiceERC-like rows (so it is described as
MELD's is: its columns, the empty cells filled with the training medians, the medians recorded), and registered in
a real sqlite store. `erc predict --recording --segments` then recomputes prosody8 from each segment of the wav
(test_recording's two espeak-ng voices, else two tones), standardised with the training statistics; its gates
give the audio experts weight where `--missing audio` (the text-only call) gives them none. Where the repository's
own store holds the leaderboard's MELD MiSTER-E, the same is checked on it.
"""

from __future__ import annotations

import sqlite3
from contextlib import closing
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest

from erc.data import canonical
from erc.data.media import MediaItem
from erc.data.voiceerc import COLUMNS, _feature_set
from erc.features.audio import load_audio
from erc.models.checkpoint import load_model
from erc.serving import predict as predict_module
from tests.fixtures import encoded_texts, train_tiny_mister_e
from tests.media_fixtures import tiny_text_model
from tests.test_recording import GIVEN, TURNS, recording, segments  # noqa: F401 (recording: a fixture)

ROOT = Path(__file__).resolve().parent.parent
NAME = "erc-tiny-mister_e"
LEADERBOARD = "erc-meld-mister_e-tuned"  # the registered name of MELD's MiSTER-E on the leaderboard
AUDIO_EXPERTS = (".speech", ".cross")  # MiSTER-E's gate: the experts that read audio


def training_prosody(table: pd.DataFrame) -> dict[str, np.ndarray]:
    """VoiceERC-like rows by utterance id: values in the ranges of its MELD CSVs, the pitch by emotion (the audio
    says something about the label), a few empty cells as VoiceERC leaves them, the last utterance without a row."""
    rng = np.random.default_rng(29)
    rows = {}
    for uid, emotion in zip(table["utterance_id"].to_numpy()[:-1], table["emotion_id"].to_numpy()[:-1]):
        rows[str(uid)] = np.array([rng.uniform(0.8, 3.0), rng.normal(72.0, 5.0), abs(rng.normal(12.0, 3.0)),
                                   rng.normal((120.0, 180.0, 240.0)[int(emotion)], 20.0), rng.uniform(10.0, 50.0),
                                   rng.uniform(50.0, 250.0), rng.uniform(2.0, 6.0), rng.normal(10.0, 3.0)])
    ids = list(rows)
    for k, column in ((2, "avg_pitch"), (4, "articulation_rate"), (6, "articulation_rate")):
        rows[ids[k]][COLUMNS.index(column)] = np.nan
    return rows


@pytest.fixture(scope="module")
def trained(tiny_emotion, tmp_path_factory):
    root = tmp_path_factory.mktemp("recording_prosody")
    table = canonical.load(tiny_emotion, feature_names=[]).table
    spec = {"model": str(tiny_text_model("bert", root / "bert")), "pooling": "mean", "max_length": 32}
    encoded_texts(tiny_emotion, root / "features", "tinybert", spec, max_length=32)
    prosody = _feature_set(table, training_prosody(table), ["generated:voiceerc-like"])
    canonical.save_features(root / "features", prosody)
    uri, _ = train_tiny_mister_e(tiny_emotion, root, {"text": "tinybert", "audio": "prosody8"},
                                 "erc-predict-recording", epochs=2, lr=3e-3)
    mlflow.MlflowClient(uri).set_registered_model_alias(NAME, "best", "1")
    return {"uri": uri, "table": table, "prosody": prosody}


def cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """`erc predict` in this process, the model from the registry: (exit status, stdout, stderr)."""
    try:
        predict_module.main(argv)
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def expected_prosody(loaded, wav: Path, times) -> tuple[np.ndarray, np.ndarray]:
    """(raw, standardised) prosody8 of each segment: erc.features.prosody of the cut, an empty cell filled with the
    training median the model records (its mean where it records none), then the training statistics."""
    from erc.features.prosody import prosody8

    name = loaded.info["inputs"]["audio"]
    median = loaded.info["feature_sets"][name].get("train_median")
    mean, std = loaded.stats[name]
    fill = np.array([median[c] for c in COLUMNS]) if median else np.asarray(mean, dtype=np.float64)
    raw = np.stack([np.where(np.isnan(v), fill, v) for v in
                    (prosody8(load_audio(MediaItem(wav, start, end))) for start, end in times)]).astype(np.float32)
    return raw, ((raw - mean) / std).astype(np.float32)


def heard_and_deaf(ref: str, uri: str, recording, directory: Path, monkeypatch, capsys):  # noqa: F811
    """`erc predict --recording --segments` with the audio and with `--missing audio`; asserts what the model read
    and that the audio moved its gates and probabilities. Returns the loaded model, the raw prosody8 of the
    segments and both outputs."""
    wav, times = recording
    texts = {k: text for k, (_, text, _) in enumerate(TURNS) if k not in GIVEN}  # every segment has its text
    table = segments(recording, directory, text=texts)
    given = ["--recording", str(wav), "--segments", str(table), "--model", ref, "--tracking-uri", uri]
    loaded = load_model(ref, uri)
    read = []  # what the model was given, standardised, in each call
    real_infer = predict_module.infer
    monkeypatch.setattr(predict_module, "infer",
                        lambda model, data: read.append((dict(data.features), dict(data.present))) or
                        real_infer(model, data))

    code, _, err = cli([*given, "--out", str(directory / "heard.csv")], capsys)
    assert code == 0, err
    assert "prosody8 is VoiceERC's method recomputed by erc" in err and "missing-audio path" not in err, err
    heard = pd.read_csv(directory / "heard.csv")
    assert heard["speaker"].tolist() == [s for s, _, _ in TURNS]  # the table's rows were out of order
    assert heard["text"].tolist() == [t for _, t, _ in TURNS] and set(heard["text_source"]) == {"given"}

    raw, standard = expected_prosody(loaded, wav, times)
    features, present = read[-1]
    assert present["audio"].all()
    np.testing.assert_array_equal(features["audio"], standard)
    rows = predict_module.recording_table(wav, table)  # and what predict recomputes before standardising
    media = predict_module.media_inputs(rows, table, loaded.info).load()
    values, _ = predict_module.modality_features(rows, table, loaded, media=media, missing=("text",))
    np.testing.assert_array_equal(values["audio"], raw)

    code, _, err = cli([*given, "--missing", "audio", "--out", str(directory / "deaf.csv")], capsys)
    assert code == 0, err
    assert not read[-1][1]["audio"].any()
    deaf = pd.read_csv(directory / "deaf.csv")

    audio_gates = [c for c in heard.columns if c.startswith("gate.") and c.endswith(AUDIO_EXPERTS)]
    assert audio_gates, list(heard.columns)
    assert (heard[audio_gates].to_numpy() > 0).all()  # the audio was used, for every utterance
    assert (deaf[audio_gates].to_numpy() == 0).all()
    gates = [c for c in heard.columns if c.startswith("gate.")]
    assert np.abs(heard[gates].to_numpy() - deaf[gates].to_numpy()).max() > 1e-4
    probs = [f"p_{label}" for label in loaded.info["labels"]]
    assert np.abs(heard[probs].to_numpy() - deaf[probs].to_numpy()).max() > 1e-4

    typed = directory / "typed.csv"  # --missing audio is the text-only call
    heard[["speaker", "text"]].to_csv(typed, index=False)
    np.testing.assert_allclose(deaf[probs].to_numpy(), predict_module.predict(typed, loaded)[probs].to_numpy(),
                               atol=1e-6)
    return loaded, raw, heard, deaf


def test_a_prosody8_model_hears_a_two_speaker_recording_cut_by_a_segment_table(trained, recording, tmp_path,  # noqa: F811
                                                                                 monkeypatch, capsys):
    prosody = trained["prosody"]
    loaded, raw, *_ = heard_and_deaf(f"{NAME}@best", trained["uri"], recording, tmp_path, monkeypatch, capsys)

    # the registry's model describes its audio as MELD's prosody8 is described, medians and statistics included
    fs = loaded.info["feature_sets"]["prosody8"]
    assert fs["columns"] == COLUMNS and fs["train_median"] == prosody.info["train_median"]
    assert fs["empty_cells_filled_with_train_median"] == {"avg_pitch": 1, "articulation_rate": 2}
    train = (trained["table"]["split"] == "train").to_numpy() & prosody.present
    values = prosody.values[train].astype(np.float32).astype(np.float64)  # as saved, and as training read them
    np.testing.assert_allclose(loaded.stats["prosody8"][0], values.mean(0), rtol=1e-6)
    np.testing.assert_allclose(loaded.stats["prosody8"][1], values.std(0), rtol=1e-6)

    pitch = raw[:, COLUMNS.index("avg_pitch")]
    assert min(pitch[[1, 3]]) > max(pitch[[0, 2]])  # two speakers: B's voice is the higher one


def leaderboard_model() -> bool:
    """The repository's store has MELD's leaderboard MiSTER-E with the alias best (after `dvc repro`)."""
    store = ROOT / "mlflow.db"
    if not store.is_file():
        return False
    try:
        with closing(sqlite3.connect(f"file:{store}?mode=ro", uri=True, timeout=5)) as db:
            return bool(db.execute("SELECT 1 FROM registered_model_aliases WHERE name = ? AND alias = 'best'",
                                   (LEADERBOARD,)).fetchone())
    except sqlite3.Error:
        return False


@pytest.mark.skipif(not leaderboard_model(), reason=f"no {LEADERBOARD}@best in {ROOT / 'mlflow.db'}")
def test_the_leaderboard_meld_model_hears_the_recording(recording, tmp_path, monkeypatch, capsys):  # noqa: F811
    """The same on the leaderboard's own MELD MiSTER-E (MiniLM text + prosody8 from VoiceERC's CSVs)."""
    loaded, raw, heard, deaf = heard_and_deaf(f"{LEADERBOARD}@best", f"sqlite:///{ROOT / 'mlflow.db'}", recording,
                                              tmp_path, monkeypatch, capsys)
    assert loaded.info["dataset"] == "meld" and loaded.info["inputs"] == {"text": "minilm", "audio": "prosody8"}
    with capsys.disabled():  # the figures for the note (pytest -s)
        print(f"\n{loaded.source}: speaker, avg_pitch Hz, emotion and gate speech/text/cross heard | --missing audio")
        for i, row in heard.iterrows():
            gates = "/".join(f"{row[f'gate.gate.{e}']:.3f}" for e in ("speech", "text", "cross"))
            off = "/".join(f"{deaf[f'gate.gate.{e}'][i]:.3f}" for e in ("speech", "text", "cross"))
            print(f"  {row['speaker']}  {raw[i, COLUMNS.index('avg_pitch')]:6.1f}  {row['emotion']:>8} {gates} | "
                  f"{deaf['emotion'][i]:>8} {off}")

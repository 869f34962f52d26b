"""Stage 1 (LoRA or full fine-tuning through Ray Train) on tiny random encoders: the loss falls, selection is on
validation, the written features are the tuned encoder's (not the original's), and test labels are not read."""

from __future__ import annotations

import json

import numpy as np
import pytest

from erc.data import canonical
from erc.errors import ErcDataError
from erc.featurize import featurize_dataset
from erc.features import encode_texts, load_encoder
from erc.stage1 import FinetuneConfig
from tests.media_fixtures import tiny_text_model

WORDS = [["great", "happy", "wonderful", "love"], ["awful", "sad", "terrible", "hate"]]


def word_dataset(seed: int = 0) -> canonical.Prepared:
    """Two classes told apart by their words; test labels are -1 (stage 1 must not need them)."""
    rng = np.random.default_rng(seed)
    records = []
    for d in range(24):
        split = "train" if d < 16 else "valid" if d < 20 else "test"
        for turn in range(4):
            c = int(rng.integers(2))
            text = " ".join(rng.choice(WORDS[c], size=3)) + " it is"
            records.append({"dialogue_id": f"d{d}", "turn": turn, "utterance_id": f"d{d}_{turn}", "speaker": "AB"[turn % 2],
                            "text": text, "split": split, **({"emotion_id": c, "emotion": "pn"[c]} if split != "test" else {"emotion_id": -1, "emotion": ""})})
    table = canonical.make_table(records)
    return canonical.Prepared(table, {"target": "emotion", "emotion_labels": ["p", "n"], "sentiment_labels": []}, {})


@pytest.mark.parametrize("kind,method", [("bert", "lora"), pytest.param("llama", "lora", marks=pytest.mark.slow),
                                         pytest.param("bert", "full", marks=pytest.mark.slow)])
def test_stage1_tunes_selects_on_validation_and_writes_the_tuned_features(ray_session, tmp_path, kind, method):
    path = tiny_text_model(kind, tmp_path / kind)
    prepared = word_dataset()
    params = {"featurize": {"batch_size": 16, "encoders": {"tuned": {
        "model": str(path), "max_length": 16,
        "finetune": {"method": method, "epochs": 4, "lr": 3e-3, "batch_size": 16, "storage_path": str(tmp_path / "ray")}}}}}
    lines = list(featurize_dataset("words", prepared, "t.parquet", params, tmp_path / "out", progress=False))
    record = json.loads((tmp_path / "out" / "tuned.stage1.json").read_text())
    losses = [r["train_loss"] for r in record["history"]]
    assert len(losses) == 4 and losses[-1] < 0.7 * losses[0], losses
    assert record["selected_epoch"] == int(np.argmax([r["val_wf1"] for r in record["history"]]))
    assert record["selected_val_wf1"] > 60.0
    assert "features of the tuned encoder (epoch" in lines[-1]
    fs = canonical.load_features(tmp_path / "out", "tuned")
    assert fs.values.shape == (96, 32) and fs.info["selected_epoch"] == record["selected_epoch"]
    tokenizer, original = load_encoder(str(path))
    before, _ = encode_texts(prepared.table["text"].tolist(), tokenizer, original, max_length=16, progress=False)
    assert np.abs(fs.values - before).max() > 1e-3  # the tuned encoder's features, not the original's
    if method == "lora":
        assert record["trainable_parameters"] < 0.2 * sum(p.numel() for p in original.parameters())


def test_stage1_only_on_the_datasets_it_names_and_bad_keys(tmp_path):
    params = {"featurize": {"encoders": {"tuned": {"model": "x", "finetune": {"datasets": ["meld"]}}}}}
    lines = list(featurize_dataset("words", word_dataset(), "t", params, tmp_path, progress=False))
    assert lines == ["words tuned: not tuned on words (finetune.datasets), skipped"]
    with pytest.raises(ErcDataError, match=r"unknown finetune key\(s\) \['rank'\]"):
        FinetuneConfig.from_params({"rank": 4})

"""Stage 1 (LoRA or full fine-tuning through Ray Train) on tiny random encoders: the loss falls, selection is on
validation, the written features are the tuned encoder's (not the original's), and test labels are not read."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from erc.data import canonical
from erc.errors import ErcDataError
from erc.features.featurize import featurize_dataset
from erc.features.text import encode_texts, load_encoder
from erc.training.finetune import FinetuneConfig, finetune_and_featurize, finetune_dataset
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


def tune(tmp_path, kind: str, method: str, *, prepared=None) -> tuple[dict, Path]:
    """Stage 1 in Ray Train's local mode (num_workers 0, the default): the loop in this process."""
    path = tiny_text_model(kind, tmp_path / kind)
    prepared = prepared or word_dataset()
    table = prepared.table
    cfg = FinetuneConfig(method=method, epochs=4, lr=1e-2, batch_size=8, head_dropout=0.0,
                         storage_path=str(tmp_path / "ray"))
    record = finetune_and_featurize(table, table["emotion_id"].to_numpy(), ["p", "n"], tmp_path / "out", "tuned",
                                    model=str(path), cfg=cfg, source=["t"], info={"model": str(path)},
                                    texts=table["text"].tolist(), max_length=16)
    return record, path


@pytest.mark.parametrize("kind,method", [("bert", "lora"), ("llama", "lora"), ("bert", "full")])
def test_stage1_tunes_selects_on_validation_and_writes_the_tuned_features(tmp_path, kind, method, capsys):
    prepared = word_dataset()
    record, path = tune(tmp_path, kind, method, prepared=prepared)
    # live progress from the loop itself: a tenth of an epoch at a time, and each epoch's validation
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("stage 1 tuned")]
    assert sum("val wF1" in line for line in printed) == 4 and any("s left in the epoch" in line for line in printed)
    losses = [r["train_loss"] for r in record["history"]]
    assert len(losses) == 4 and losses[-1] < 0.5 * record["first_batch_loss"], (record["first_batch_loss"], losses)
    assert record["selected_epoch"] == int(np.argmax([r["val_wf1"] for r in record["history"]]))
    assert record["selected_val_wf1"] > 60.0
    fs = canonical.load_features(tmp_path / "out", "tuned")
    assert fs.values.shape == (96, 32) and fs.info["selected_epoch"] == record["selected_epoch"]
    tokenizer, original = load_encoder(str(path))
    before, _ = encode_texts(prepared.table["text"].tolist(), tokenizer, original, max_length=16, progress=False)
    assert np.abs(fs.values - before).max() > 1e-3  # the tuned encoder's features, not the original's
    if method == "lora":
        assert record["trainable_parameters"] < 0.2 * sum(p.numel() for p in original.parameters())


def test_stage1_runs_in_ray_train_from_the_featurize_params(ray_session, tmp_path):
    path = tiny_text_model("bert", tmp_path / "bert")
    params = {"featurize": {"batch_size": 16, "encoders": {"tuned": {
        "model": str(path), "max_length": 16,
        "finetune": {"epochs": 2, "lr": 3e-3, "batch_size": 16, "num_workers": 1, "storage_path": str(tmp_path / "ray")}}}}}
    # The featurize stage's own work leaves a tuned encoder to stage 1, which the stage program runs after it.
    assert list(featurize_dataset("words", word_dataset(), "t.parquet", params, tmp_path / "out", progress=False)) == []
    lines = list(finetune_dataset("words", word_dataset(), "t.parquet", params, tmp_path / "out"))
    assert [line.split(":")[0] for line in lines] == ["words tuned stage 1 epoch 0", "words tuned stage 1 epoch 1",
                                                      "words tuned"]
    assert canonical.load_features(tmp_path / "out", "tuned").values.shape == (96, 32)
    # The featurize stage probes every set of its folder: the stage-1 record must not pass for one.
    assert canonical.feature_set_names(tmp_path / "out") == ["tuned"]


def test_stage1_only_on_the_datasets_it_names_and_bad_keys(tmp_path):
    params = {"featurize": {"encoders": {"tuned": {"model": "x", "finetune": {"datasets": ["meld"]}}}}}
    lines = list(finetune_dataset("words", word_dataset(), "t", params, tmp_path))
    assert lines == ["words tuned: not tuned on words (finetune.datasets), skipped"]
    with pytest.raises(ErcDataError, match=r"unknown finetune key\(s\) \['rank'\]"):
        FinetuneConfig.from_params({"rank": 4})


def test_speech_stage1_on_generated_clips(tmp_path):
    """A tiny wav2vec2 tuned with LoRA on two pitch classes of generated clips; its features are written for all."""
    from erc.data import folder_labels
    from erc.data.media import media_items
    from erc.features.audio import load_audio
    from erc.features.speech import SpeechEncoder
    from tests.media_fixtures import tiny_speech_model
    from tests.test_media_layouts import OPTIONS, make_corpus

    corpus = make_corpus(tmp_path / "clips", speakers=6, per_label=2)
    files = canonical_files(corpus)
    prepared, _ = folder_labels.build(files, OPTIONS)
    table = prepared.table
    model = tiny_speech_model("wav2vec2", tmp_path / "w2v")
    cfg = FinetuneConfig(epochs=4, lr=1e-2, batch_size=8, crop_seconds=0.5, head_dropout=0.0)
    record = finetune_and_featurize(table, table["emotion_id"].to_numpy(), ["angry", "sad"], tmp_path / "out", "w2v",
                                    model=str(model), cfg=cfg, source=["t"], info={"model": str(model)},
                                    items=media_items(table, {"layout": "folder", "files": "clips"}, files))
    losses = [r["train_loss"] for r in record["history"]]
    assert losses[-1] < 0.6 * record["first_batch_loss"], (record["first_batch_loss"], losses)
    fs = canonical.load_features(tmp_path / "out", "w2v")
    assert fs.values.shape == (24, 32) and fs.modality == "audio" and fs.info["selected_epoch"] == record["selected_epoch"]
    original = SpeechEncoder(model=str(model))
    first = load_audio(corpus / table["utterance_id"][0])
    assert np.abs(original(first) - fs.values[0]).max() > 1e-4  # the tuned encoder's features


def canonical_files(root):
    from erc.sources import DatasetFiles

    return DatasetFiles({"clips": {"path": str(root)}})


def test_readme_stage1_params_are_accepted():
    """The README's stage-1 params block: every key is one that erc reads."""
    from dataclasses import fields
    from pathlib import Path

    import yaml

    from erc.data.media import LAYOUTS
    from erc.features.speech import SpeechEncoder
    from erc.features.text import TextEncoderSpec

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    params = yaml.safe_load(readme.split("### Stage 1")[1].split("```yaml\n")[1].split("```")[0])
    section = params["featurize"]
    for spec in section["encoders"].values():
        FinetuneConfig.from_params(TextEncoderSpec.from_params(spec).finetune)
    for spec in section["speech"].values():
        assert set(spec) <= {f.name for f in fields(SpeechEncoder)}
        if spec.get("finetune"):
            FinetuneConfig.from_params(spec["finetune"])
    assert {m["layout"] for m in section["media"].values()} <= set(LAYOUTS)
    for inputs in params["inputs"].values():
        assert set(inputs.values()) <= set(section["encoders"]) | set(section["speech"])

"""Memory that grows with the corpus no faster than the memory-mapped feature matrix, and the same numbers as the
whole-matrix path it replaced: feature matrices are read memory-mapped, a split standardises the rows a batch reads
(no standardised copy of the matrix), the training statistics are streamed, texts are tokenized batch by batch and
the speaker-independent probe standardises its gathered fold in place. Each new path is compared here with the old
formula, written out, to the last bit."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from erc.data import canonical
from erc.data.dialogues import DialogueData, Standardised, feature_stats, row_moments, split_data
from erc.evaluation.probe import speaker_independent_probe
from erc.features.text import default_pooling, encode_texts, is_decoder_only, load_encoder, pool
from tests.fixtures import INPUTS, make_prepared
from tests.media_fixtures import tiny_text_model


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A generated prepared dataset big enough for several batches (audio8 has a row without features)."""
    return make_prepared(tmp_path_factory.mktemp("bounded") / "emotion",
                         splits=(("train", 60), ("valid", 12), ("test", 12)))


def old_split_matrices(prep, inputs, stats) -> dict[str, np.ndarray]:
    """The replaced split_data: a standardised float32 copy of every row, rows without features 0."""
    out = {}
    for modality, name in inputs.items():
        fs = prep.features[name]
        mean, std = stats[name]
        out[modality] = ((np.asarray(fs.values) - mean) / std).astype(np.float32)
        if fs.present is not None:
            out[modality][~fs.present] = 0.0
    return out


def old_feature_stats(prep, name):
    """The replaced feature_stats: a float64 copy of the training rows."""
    fs = prep.features[name]
    train = (prep.table["split"] == "train").to_numpy()
    if fs.present is not None:
        train = train & fs.present
    values = np.asarray(fs.values)[train].astype(np.float64)
    return values.mean(0).astype(np.float32), np.maximum(values.std(0), 1e-6).astype(np.float32)


def test_features_are_memory_mapped_and_shared_by_the_splits(prepared):
    prep = canonical.load(prepared)
    for fs in prep.features.values():
        assert isinstance(fs.values, np.memmap) and fs.values.dtype == np.float32
        assert not fs.values.flags.writeable  # read-only: nothing may change the file under other readers
    stats = {n: feature_stats(prep, n) for n in INPUTS.values()}
    data = split_data(prep, "train", INPUTS, "emotion", stats)
    for modality, name in INPUTS.items():
        view = data.features[modality]
        assert isinstance(view, Standardised) and view.values is prep.features[name].values  # no copy of the rows
        assert view.shape == prep.features[name].values.shape


def test_standardised_batches_equal_the_whole_matrix_path(prepared):
    prep = canonical.load(prepared)
    stats = {n: old_feature_stats(prep, n) for n in INPUTS.values()}
    assert prep.features["audio8"].present is not None and not prep.features["audio8"].present.all()
    for split in ("train", "valid", ("train", "valid"), "test"):
        new = split_data(prep, split, INPUTS, "emotion", stats)
        old = DialogueData(new.dialogues, old_split_matrices(prep, INPUTS, stats), new.present)
        batches = 0
        for indices in new.batch_indices(4, shuffle=True, seed=3):
            a, b = new.collate(indices), old.collate(indices)
            for m in INPUTS:
                assert a.features[m].dtype == torch.float32
                assert a.features[m].numpy().tobytes() == b.features[m].numpy().tobytes()
                assert torch.equal(a.modality_mask[m], b.modality_mask[m])
            batches += 1
        assert batches > 1
        for m in INPUTS:  # the whole view too, as an array
            assert np.asarray(new.features[m]).tobytes() == old.features[m].tobytes()


def test_streamed_statistics_are_numpys_to_the_last_bit():
    """row_moments in float64 against np.mean / np.std over the float64 rows: equal bit for bit (not within an ulp),
    across block boundaries, one-column matrices and mixed magnitudes; feature_stats against the replaced formula."""
    rng = np.random.default_rng(7)
    for n, dim, block in [(5000, 1, 512), (3001, 3, 100), (2048, 384, 1000), (777, 16, 777), (10, 5, 3)]:
        values = (rng.normal(size=(n, dim)) * rng.uniform(0.01, 300.0, size=dim) + rng.normal(0, 50, size=dim))
        values = values.astype(np.float32)
        rows = np.flatnonzero(rng.uniform(size=n) < 0.7)
        whole = values[rows].astype(np.float64)
        mean, std = row_moments(values, rows, block_rows=block)
        assert mean.tobytes() == whole.mean(0).tobytes() and std.tobytes() == whole.std(0).tobytes(), (n, dim)

    n = 6000  # more than one default block of rows, a presence mask, through feature_stats itself
    table = pd.DataFrame({"split": rng.choice(["train", "valid", "test"], size=n, p=[0.8, 0.1, 0.1])})
    present = rng.uniform(size=n) < 0.95
    values = (rng.normal(size=(n, 24)) * 40 + 3).astype(np.float32)
    prep = canonical.Prepared(table, {}, {"f": canonical.FeatureSet("f", "text", values, ["generated"], present)})
    got, expected = feature_stats(prep, "f"), old_feature_stats(prep, "f")
    assert got[0].tobytes() == expected[0].tobytes() and got[1].tobytes() == expected[1].tobytes()


@torch.inference_mode()
def old_encode_texts(texts, tokenizer, model, *, batch_size, max_length):
    """The replaced encode_texts: every text tokenized up front, then the same length-sorted batches."""
    pooling = default_pooling(model)
    ids = tokenizer(list(texts), truncation=True, max_length=max_length, add_special_tokens=True)["input_ids"]
    order = np.argsort([len(x) for x in ids], kind="stable")
    out = np.zeros((len(texts), model.config.hidden_size), dtype=np.float32)
    for b in range(0, len(order), batch_size):
        rows = np.sort(order[b:b + batch_size])
        batch = tokenizer.pad({"input_ids": [ids[i] for i in rows]}, return_tensors="pt")
        kwargs = {"use_cache": False} if is_decoder_only(model.config) else {}
        result = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kwargs)
        out[rows] = pool(result.last_hidden_state, batch["attention_mask"], pooling).float().numpy()
    return out


def test_texts_tokenized_per_batch_encode_as_before(tmp_path):
    torch.manual_seed(0)
    tokenizer, model = load_encoder(str(tiny_text_model("bert", tmp_path / "bert")), device="cpu")
    rng = np.random.default_rng(0)
    words = ["hi", "no", "what", "a", "wonderful", "day", "angry", "you", "right", "now", "okay", "then", "the"]
    # More texts than one tokenizing block (4096), lengths from 1 to past max_length (truncated).
    texts = [" ".join(rng.choice(words, size=int(rng.integers(1, 40)))) for _ in range(4200)]
    new, _ = encode_texts(texts, tokenizer, model, batch_size=256, max_length=24, progress=False)
    old = old_encode_texts(texts, tokenizer, model, batch_size=256, max_length=24)
    assert new.tobytes() == old.tobytes()


def old_probe(features, labels, speakers, *, folds=3, seed=0):
    """The replaced probe's per-fold accuracies: the scaler standardising a copy."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score
    from sklearn.model_selection import StratifiedGroupKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    accuracy = []
    for train, test in StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed).split(
            features, labels, groups=speakers):
        probe = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=3000))
        probe.fit(features[train], labels[train])
        accuracy.append(float(accuracy_score(labels[test], probe.predict(features[test]))))
    return accuracy


def test_probe_reads_a_memory_map_and_scores_as_before(tmp_path):
    rng = np.random.default_rng(1)
    n, dim = 600, 12
    labels = rng.integers(0, 3, size=n)
    values = (rng.normal(size=(n, dim)) * 5 + labels[:, None] * 0.7).astype(np.float32)
    speakers = np.array([f"s{i % 9}" for i in range(n)])
    np.save(tmp_path / "f.npy", values)
    mapped = np.load(tmp_path / "f.npy", mmap_mode="r")
    result = speaker_independent_probe(mapped, labels, speakers, folds=3)
    assert result["accuracy_per_fold"] == old_probe(values, labels, speakers)
    assert np.array_equal(np.load(tmp_path / "f.npy"), values)  # the file (and the caller's matrix) untouched


def test_leakage_probe_reads_a_memory_map_and_scores_as_before(tmp_path):
    """The prepare stage's leakage probe standardises its gathered rows in place: the same scores as the scaler's
    copies gave, and the memory-mapped file untouched."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score
    from sklearn.preprocessing import StandardScaler

    from erc.evaluation.leakage import probe

    rng = np.random.default_rng(2)
    split = np.array(["train"] * 300 + ["valid"] * 100 + ["test"] * 100)
    y = rng.integers(0, 3, size=len(split))
    values = (rng.normal(size=(len(y), 6)) * 4 + y[:, None]).astype(np.float32)
    np.save(tmp_path / "f.npy", values)
    mapped = canonical.FeatureSet("mapped", "text", np.load(tmp_path / "f.npy", mmap_mode="r"), ["generated"])
    table = pd.DataFrame({"split": split, "emotion_id": y})
    result = probe(table, mapped, "emotion", ["a", "b", "c"], max_gap=10)

    rows = {s: np.flatnonzero(split == s) for s in ("train", "valid", "test")}
    scaler = StandardScaler().fit(values[rows["train"]])
    clf = LogisticRegression(max_iter=2000, random_state=0).fit(scaler.transform(values[rows["train"]]), y[rows["train"]])
    for s, r in rows.items():
        old = 100 * f1_score(y[r], clf.predict(scaler.transform(values[r])), average="weighted")
        assert result[f"{s}_wf1"] == pytest.approx(round(old, 2), abs=0.006), s
    assert np.array_equal(np.load(tmp_path / "f.npy"), values)

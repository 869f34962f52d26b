"""Tiny prepared datasets in the canonical form, for the training-side tests.

`make_prepared(directory, kind="emotion")` writes (with `erc.data.canonical.save`) a dataset of
dialogues of 3-7 utterances between two speakers, with a text feature set whose class-dependent mean
makes the label learnable, and an audio feature set with one row missing (a `present` mask).
`kind="mosi"` writes the MOSI-like variant: binary sentiment target plus a continuous score.

The model tests share their common procedures here: `overfit` (train on one tiny batch), `seeded_loss` (the
training-mode loss of a model built after seeding), `shortest_and_longest` + `alone_and_padded` (a dialogue alone
and padded next to a longer one), `pad` (more padded positions at the end of every dialogue), `missing_audio_batch`
(the dialogue whose utterance has no audio, and that utterance's position) and `one_torch_thread` (torch on one
intra-op thread). The prediction and serving tests share `encoded_texts` (the tiny dataset's texts through an encoder,
as a feature set) and `train_tiny_mister_e` (a real training run of MiSTER-E at tiny widths, tracked and registered).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import torch

from erc.data import canonical
from erc.data.dialogues import IGNORE, Batch
from erc.models import ModelOutput, build_model
from erc.training.config import TrainConfig
from erc.training.loop import seed_everything
from erc.training.task import load_task

EMOTIONS = ["a", "b", "c"]
SENTIMENTS = ["negative", "positive"]
TEXT_DIM, AUDIO_DIM = 16, 8
INPUTS = {"text": "text16", "audio": "audio8"}
MISSING_AUDIO_ROW = 1  # the one utterance without audio features


def _make_emotion_or_mosi(directory, *, kind: str, seed: int, splits, noise: float) -> Path:
    if kind not in ("emotion", "mosi"):
        raise ValueError(kind)
    rng = np.random.default_rng(seed)
    n_classes = len(EMOTIONS) if kind == "emotion" else len(SENTIMENTS)
    means = rng.normal(0.0, 2.0, size=(n_classes, TEXT_DIM))

    records, text_rows, audio_rows = [], [], []
    d = 0
    for split, n_dialogues in splits:
        for _ in range(n_dialogues):
            length = int(rng.integers(3, 8))
            # Every class appears in every dialogue of 3+ utterances: all classes are in every split.
            classes = rng.permutation(np.resize(rng.permutation(n_classes), length))
            speakers = rng.choice(["A", "B"], size=length)
            for turn in range(length):
                c = int(classes[turn])
                rec = {"dialogue_id": f"d{d:02d}", "turn": turn, "utterance_id": f"d{d:02d}_u{turn}",
                       "speaker": str(speakers[turn]), "text": f"utterance {turn} of dialogue {d}", "split": split}
                text = means[c] + noise * rng.normal(size=TEXT_DIM)
                if kind == "emotion":
                    rec.update(emotion_id=c, emotion=EMOTIONS[c])
                else:
                    magnitude = float(rng.uniform(0.2, 3.0))
                    score = magnitude if c == 1 else -magnitude
                    rec.update(sentiment_id=c, sentiment=SENTIMENTS[c], sentiment_score=round(score, 3))
                    text[0] += score
                records.append(rec)
                text_rows.append(text)
                audio_rows.append(rng.normal(size=AUDIO_DIM))
            d += 1

    table = canonical.make_table(records)
    n = len(table)
    present = np.ones(n, dtype=bool)
    present[MISSING_AUDIO_ROW] = False
    audio = np.asarray(audio_rows, dtype=np.float32)
    audio[~present] = 0.0
    features = {
        "text16": canonical.FeatureSet("text16", "text", np.asarray(text_rows, dtype=np.float32), ["tiny:text"]),
        "audio8": canonical.FeatureSet("audio8", "audio", audio, ["tiny:audio"], present=present),
    }
    meta = {
        "dataset": f"tiny-{kind}",
        "target": "emotion" if kind == "emotion" else "sentiment",
        "emotion_labels": EMOTIONS if kind == "emotion" else [],
        "sentiment_labels": [] if kind == "emotion" else SENTIMENTS,
        "has_sentiment_score": kind == "mosi",
        "sources": {},
    }
    directory = Path(directory)
    canonical.save(canonical.Prepared(table, meta, features), directory)
    return directory


MELD_SENTIMENTS = ["negative", "neutral", "positive"]


def make_prepared(directory, *, kind: str = "emotion", seed: int = 0, splits=(("train", 8), ("valid", 2), ("test", 2)),
                  noise: float = 0.3) -> Path:
    """Write a tiny prepared dataset to `directory` and return its path.

    `kind="meld"` writes the emotion dataset plus a 3-way sentiment label on every utterance
    (meta sentiment_labels negative/neutral/positive, sentiment_id set everywhere), drawn independently of
    the emotion and learnable from a sentiment-dependent shift of the text features (MELD's two annotations)."""
    if kind != "meld":
        return _make_emotion_or_mosi(directory, kind=kind, seed=seed, splits=splits, noise=noise)
    directory = _make_emotion_or_mosi(directory, kind="emotion", seed=seed, splits=splits, noise=noise)
    prep = canonical.load(directory)
    rng = np.random.default_rng(seed + 1)
    table = prep.table.copy()
    sentiment = np.empty(len(table), dtype=np.int64)
    for _, rows in table.groupby("dialogue_id", sort=False).groups.items():  # every class in every dialogue
        sentiment[rows] = rng.permutation(np.resize(rng.permutation(len(MELD_SENTIMENTS)), len(rows)))
    table["sentiment_id"] = sentiment
    table["sentiment"] = np.asarray(MELD_SENTIMENTS, dtype=object)[sentiment]
    text = prep.features["text16"]
    text.values = (text.values + rng.normal(0.0, 2.0, size=(len(MELD_SENTIMENTS), TEXT_DIM))[sentiment]).astype(np.float32)
    meta = {k: v for k, v in prep.meta.items() if k not in ("features", "counts")}
    meta.update(dataset="tiny-meld", sentiment_labels=MELD_SENTIMENTS)
    canonical.save(canonical.Prepared(canonical.make_table(table), meta, prep.features), directory)
    return directory


# ---------------------------------------------------------------- shared model-test procedures


def tiny_project(tmp, **sections) -> Path:
    """`tmp` with the project's params.yaml pointed at it: its data_dir holds the prepared dataset `tiny`, read with
    INPUTS, and runs checkpoint under it; `sections` update params' sections (`train={...}`)."""
    import yaml

    tmp = Path(tmp)
    make_prepared(tmp / "data" / "prepared" / "tiny", kind="emotion")
    params = yaml.safe_load((Path(__file__).resolve().parent.parent / "params.yaml").read_text())
    params["data_dir"] = str(tmp / "data")
    params["inputs"]["tiny"] = dict(INPUTS)
    params["train"]["storage_path"] = str(tmp / "ray_results")
    for section, values in sections.items():
        params[section].update(values)
    (tmp / "params.yaml").write_text(yaml.safe_dump(params))
    return tmp


def task_of(path, inputs=INPUTS):
    """The train and valid splits of a prepared fixture as a Task (what a model test builds from)."""
    return load_task(TrainConfig(dataset="tiny", prepared=str(path), inputs=dict(inputs)), splits=("train", "valid"))


@contextlib.contextmanager
def one_torch_thread():
    """Torch on one intra-op thread inside the block, its previous count restored after (the model tests' tiny
    tensors: more threads only spin-wait on a busy machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def overfit(model, batch, *, steps: int, lr: float, first_of: str | None = None) -> tuple[ModelOutput, float]:
    """Train `model` on `batch` alone with Adam(lr) for `steps` steps (train mode, total loss).

    Returns the eval-mode output on `batch` after training (under no_grad) and the first step's loss: the total
    loss, or the loss term `first_of` where one is named."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    first = None
    for _ in range(steps):
        model.train()
        out = model(batch)
        if first is None:
            first = float((out.loss if first_of is None else out.losses[first_of]).detach())
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        out = model(batch)
    return out, first


def seeded_loss(name: str, spec, config, batch, seed: int) -> float:
    """The loss on `batch` of model `name` built after `seed_everything(seed)`, in train mode (dropout draws from
    the seed too), under no_grad."""
    seed_everything(seed)
    model = build_model(name, spec, config).train()
    with torch.no_grad():
        return float(model(batch).loss)


def shortest_and_longest(data) -> tuple[int, int, int]:
    """The indices of the shortest and the longest dialogue in `data` and the shortest one's length (asserted
    shorter than the longest, so that next to it the short one really is padded)."""
    lengths = [len(d.rows) for d in data.dialogues]
    short, long = int(np.argmin(lengths)), int(np.argmax(lengths))
    n = lengths[short]
    assert lengths[long] > n  # so the short one really is padded
    return short, long, n


def alone_and_padded(model, collate, short, long, n: int):
    """`model`'s outputs (under no_grad) on dialogue `short` alone and on the batch [long, short], where `short`
    (of `n` utterances) is padded; asserts the padded batch masks exactly its `n` real positions.

    `collate` makes a batch from a list of dialogues (indices for `DialogueData.collate`).
    Returns (alone, padded_batch, padded)."""
    with torch.no_grad():
        alone = model(collate([short]))
        padded_batch = collate([long, short])
        padded = model(padded_batch)
    assert padded_batch.mask[1].sum() == n and not padded_batch.mask[1, n:].any()
    return alone, padded_batch, padded


def pad(batch: Batch, extra: int, junk: float = 0.0) -> Batch:
    """The same dialogues with `extra` more padded positions at the end of each; their features are `junk` (which
    must not matter), their masks False and their labels IGNORE."""

    def grow(x, value):
        return torch.cat([x, torch.full((x.shape[0], extra, *x.shape[2:]), value, dtype=x.dtype)], dim=1)

    return Batch({m: grow(v, junk) for m, v in batch.features.items()},
                 {m: grow(v, False) for m, v in batch.modality_mask.items()}, grow(batch.mask, False),
                 grow(batch.speakers, 0), grow(batch.labels, IGNORE), grow(batch.sentiment, IGNORE),
                 grow(batch.score, float("nan")), grow(batch.rows, -1))


TINY_MISTER_E = {"width": 16, "attn_dim": 12, "heads": 3, "gru_layers": 1, "cross_blocks": 1}


def encoded_texts(prepared, directory, name: str, spec: dict, **encode) -> None:
    """The prepared dataset's texts through `spec`'s encoder, saved as the text feature set `name` in `directory`."""
    from erc.features.text import encode_texts, load_encoder

    table = canonical.load(prepared, feature_names=[]).table
    values, _ = encode_texts(table["text"].tolist(), *load_encoder(spec["model"]), progress=False, **encode)
    canonical.save_features(directory, canonical.FeatureSet(name, "text", values, ["tiny"], None, dict(spec)))


def train_tiny_mister_e(prepared, root, inputs: dict, experiment: str, **train) -> tuple[str, dict]:
    """MiSTER-E at tiny widths trained by erc's training code (Ray Train, local mode) on the feature sets under
    root/features, tracked and registered in root/mlflow.db: the tracking URI and the run's result."""
    from erc.training.driver import run  # Ray: imported by the tests that train, not by every model test

    uri = f"sqlite:///{Path(root) / 'mlflow.db'}"
    cfg = TrainConfig(dataset="tiny", prepared=str(prepared), feature_dirs=[str(Path(root) / "features")],
                      inputs=dict(inputs), model="mister_e", model_config=dict(TINY_MISTER_E), batch_size=4,
                      storage_path=str(Path(root) / "ray"), tracking_uri=uri, experiment=experiment, **train)
    return uri, run(cfg)


def missing_audio_batch(data, more: int = 0) -> tuple[Batch, int]:
    """A batch whose first dialogue holds the utterance without audio (`MISSING_AUDIO_ROW`), followed by the next
    `more` dialogues, and that utterance's position in the first dialogue."""
    index = next(i for i, d in enumerate(data.dialogues) if MISSING_AUDIO_ROW in d.rows)
    batch = data.collate([(index + k) % len(data) for k in range(more + 1)])
    return batch, int(np.flatnonzero(batch.rows[0].numpy() == MISSING_AUDIO_ROW)[0])

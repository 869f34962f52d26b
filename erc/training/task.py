"""A dataset ready to train on, and scoring a model on one of its splits.

`load_task(cfg)` reads the prepared dataset and the run's feature sets into dialogues per split, standardised
with the training split's statistics, and tells the model what the data gives it (`ModelSpec`). `predict` and
`score` give a split's predictions and metrics.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from erc.data import canonical
from erc.data.dialogues import IGNORE, DialogueData, feature_stats, speaker_names, split_data
from erc.metrics import split_metrics
from erc.models import ModelSpec, probabilities
from erc.training.config import TrainConfig, class_weights_for


@dataclass
class Task:
    """A dataset ready to train on: splits as dialogues, label names, what the model is told."""

    prepared: canonical.Prepared
    target: str
    labels: list[str]
    splits: dict[str, DialogueData]
    spec: ModelSpec
    stats: dict
    speaker_names: list[str] | None = None  # `speakers: name`: the index every dialogue's speakers take

    @property
    def has_score(self) -> bool:
        return self.spec.has_score

def load_task(cfg: TrainConfig, splits=("train", "valid")) -> Task:
    prep = canonical.load(cfg.prepared, extra_feature_dirs=cfg.feature_dirs, feature_names=list(cfg.inputs.values()))
    target = prep.meta["target"]
    labels = prep.meta[f"{target}_labels"]
    stats = {name: feature_stats(prep, name) for name in cfg.inputs.values()}
    paper = cfg.protocol == "paper" and cfg.paper_train_on_valid  # no validation: its dialogues are trained on
    data = {s: split_data(prep, ("train", "valid") if paper and s == "train" else s, cfg.inputs, target, stats,
                          speakers=cfg.speakers)
            for s in splits if not (paper and s == "valid")}
    train_labels = prep.table.loc[prep.table["split"] == "train", f"{target}_id"].to_numpy().astype(np.int64)
    spec = ModelSpec(
        input_dims={m: prep.features[n].dim for m, n in cfg.inputs.items()},
        num_classes=len(labels),
        num_sentiment_classes=len(prep.meta["sentiment_labels"]) if target == "emotion" else 0,
        has_score=bool(prep.meta.get("has_sentiment_score")),
        class_weights=class_weights_for(cfg.class_weights, labels, train_labels, f"train.class_weights ({cfg.dataset})"),
    )
    names = speaker_names(prep.table) if cfg.speakers == "name" else None
    return Task(prep, target, labels, data, spec, stats, names)

_loaded: dict = {}  # the last task this process loaded for training (a reused Tune trial actor trains on it again)

def load_task_cached(cfg: TrainConfig) -> Task:
    """`load_task(cfg)`, loaded once per process for the same data, inputs and class weights."""
    meta = Path(cfg.prepared) / "meta.json"
    key = (cfg.prepared, tuple(cfg.feature_dirs), tuple(sorted(cfg.inputs.items())), json.dumps(cfg.class_weights),
           cfg.speakers, cfg.protocol, cfg.paper_train_on_valid, meta.stat().st_mtime_ns if meta.exists() else 0)
    if key not in _loaded:
        _loaded.clear()
        _loaded[key] = load_task(cfg, splits=("train", "test") if cfg.protocol == "paper" else ("train", "valid"))
    return _loaded[key]

@torch.inference_mode()
def predict(model, data: DialogueData, batch_size: int = 32, device="cpu", float_dtype=None) -> dict[str, np.ndarray]:
    """Predictions for every labelled utterance of `data`, in table-row order."""
    model.eval()
    if not len(data):
        return {}
    rows, true, pred, probs, score_true, score_pred = [], [], [], [], [], []
    for batch in data.batches(batch_size):
        out = model(batch.to(device, float_dtype))
        keep = batch.labels != IGNORE
        rows.append(batch.rows[keep].numpy())
        true.append(batch.labels[keep].numpy())
        pred.append(out.logits.argmax(-1).cpu()[keep].numpy())
        probs.append(probabilities(out).cpu()[keep].numpy())
        if out.score is not None:
            score_true.append(batch.score[keep].numpy())
            score_pred.append(out.score.float().cpu()[keep].numpy())
    found = {"rows": rows, "true": true, "pred": pred, "probs": probs}
    if score_pred:
        found.update(score_true=score_true, score_pred=score_pred)
    return merge_predictions([{k: np.concatenate(v) for k, v in found.items()}])

def merge_predictions(parts: list[dict]) -> dict[str, np.ndarray]:
    """One split's predictions from several workers' parts, in table-row order."""
    parts = [p for p in parts if len(p.get("rows", ()))]
    result = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    order = np.argsort(result["rows"], kind="stable")
    return {k: v[order] for k, v in result.items()}

def evaluate(model, data: DialogueData, task: Task, prefix: str) -> tuple[dict, np.ndarray, dict]:
    """Metrics, confusion matrix and the predictions themselves, over the whole split."""
    return score(predict(model, data), task, prefix)

def score(p: dict, task: Task, prefix: str) -> tuple[dict, np.ndarray, dict]:
    metrics, cm = split_metrics(p["true"], p["pred"], task.labels, target=task.target,
                                score_true=p.get("score_true"), score_pred=p.get("score_pred"), prefix=prefix)
    return metrics, cm, p

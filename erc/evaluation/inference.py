"""A trained model's per-utterance outputs: class probabilities and gate weights, optionally with modalities removed.

`infer(model, data)` runs any registered model over a split (or a conversation) and returns, for every real
utterance in table-row order, its class probabilities and the weights of each of the model's gates and routers
(`erc.models.gates`). `drop=("audio",)` removes a modality the way a model meets a missing one: its modality
mask False (and zero features, as the data loader gives a missing row), so each model takes its own
missing-modality path. `zeros=("audio",)` is the contrast: zero features still marked present, zeros posing
as data.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import torch

from erc.data.dialogues import Batch, DialogueData
from erc.models import gates, probabilities


@dataclass
class GateOutputs:
    """One gate over the utterances of a split: weights (N, E) over `names`, valid (N,) bool."""

    names: list[str]
    weights: np.ndarray
    valid: np.ndarray
    top_k: int | None = None


@dataclass
class Outputs:
    rows: np.ndarray  # (N,) table row of each real utterance, ascending
    labels: np.ndarray  # (N,) target class; IGNORE where unlabelled
    probs: np.ndarray  # (N, C) class probabilities
    gates: dict[str, GateOutputs] = field(default_factory=dict)
    score: np.ndarray | None = None  # (N,) continuous sentiment where the model has a score head

    @property
    def pred(self) -> np.ndarray:
        return self.probs.argmax(-1)


def remove(batch: Batch, modalities=(), *, as_zeros=()) -> Batch:
    """`batch` with `modalities` missing (modality mask False, features zero) and the `as_zeros` modalities'
    features zero but still marked present."""
    features, present = dict(batch.features), dict(batch.modality_mask)
    for m in (*modalities, *as_zeros):
        if m not in features:
            raise ValueError(f"no {m!r} modality in the batch (has {sorted(features)})")
        features[m] = torch.zeros_like(features[m])
    for m in modalities:
        present[m] = torch.zeros_like(present[m])
    return replace(batch, features=features, modality_mask=present)


@torch.inference_mode()
def infer(model, data: DialogueData, *, drop=(), zeros=(), batch_size: int = 32) -> Outputs:
    """Eval-mode outputs of `model` on every real utterance of `data` (see the module docstring)."""
    model.eval()
    rows, labels, probs, scores, found = [], [], [], [], {}
    for batch in data.batches(batch_size):
        batch = remove(batch, drop, as_zeros=zeros)
        out = model(batch)
        real = batch.mask
        rows.append(batch.rows[real].numpy())
        labels.append(batch.labels[real].numpy())
        probs.append(probabilities(out)[real].numpy())
        if out.score is not None:
            scores.append(out.score.float()[real].numpy())
        for name, g in gates(model, batch, out).items():
            part = found.setdefault(name, (g.names, g.top_k, [], []))
            part[2].append(g.weights.float()[real].numpy())
            part[3].append(g.valid[real].numpy())
    if not rows:
        raise ValueError("no utterances to run the model on")
    order = np.argsort(np.concatenate(rows), kind="stable")
    return Outputs(
        rows=np.concatenate(rows)[order], labels=np.concatenate(labels)[order], probs=np.concatenate(probs)[order],
        gates={name: GateOutputs(names, np.concatenate(w)[order], np.concatenate(v)[order], top_k)
               for name, (names, top_k, w, v) in found.items()},
        score=np.concatenate(scores)[order] if scores else None)

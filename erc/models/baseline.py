"""Context baseline: a bidirectional GRU over the dialogue per modality, concatenation, classifier.

Not from a paper: the floor that every other model must clear on the same features and protocol.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from erc.data.dialogues import IGNORE, Batch
from erc.models import ModelOutput, ModelSpec, register


@dataclass
class BaselineConfig:
    hidden: int = 128  # GRU state per direction
    dropout: float = 0.3
    score_weight: float = 1.0  # weight of the L1 regression loss where the dataset has a score


class ModalityGRU(nn.Module):
    """(B, T, D) features of one modality -> (B, T, 2H) dialogue-contextual states."""

    def __init__(self, dim: int, hidden: int, dropout: float):
        super().__init__()
        self.proj = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.gru = nn.GRU(hidden, hidden, batch_first=True, bidirectional=True)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        x = self.proj(x) * mask.unsqueeze(-1)
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, _ = self.gru(packed)
        out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])
        return out


@register("baseline")
class ContextBaseline(nn.Module):
    Config = BaselineConfig

    def __init__(self, config: BaselineConfig, spec: ModelSpec):
        super().__init__()
        self.config, self.spec = config, spec
        self.modalities = sorted(spec.input_dims)
        self.encoders = nn.ModuleDict({m: ModalityGRU(spec.input_dims[m], config.hidden, config.dropout)
                                       for m in self.modalities})
        fused = 2 * config.hidden * len(self.modalities)
        self.trunk = nn.Sequential(nn.Dropout(config.dropout), nn.Linear(fused, 2 * config.hidden), nn.ReLU(),
                                   nn.Dropout(config.dropout))
        self.classifier = nn.Linear(2 * config.hidden, spec.num_classes)
        self.score_head = nn.Linear(2 * config.hidden, 1) if spec.has_score else None
        weights = torch.tensor(spec.class_weights, dtype=torch.float32) if spec.class_weights else None
        self.register_buffer("class_weights", weights, persistent=False)

    def forward(self, batch: Batch) -> ModelOutput:
        lengths = batch.mask.sum(1)
        states = [self.encoders[m](batch.features[m], batch.modality_mask[m], lengths) for m in self.modalities]
        h = self.trunk(torch.cat(states, dim=-1))  # (B, T, 2H)
        logits = self.classifier(h)
        out = ModelOutput(logits=logits)
        if self.score_head is not None:
            out.score = self.score_head(h).squeeze(-1)

        if (batch.labels != IGNORE).any():
            out.losses["ce"] = F.cross_entropy(logits.flatten(0, 1), batch.labels.flatten(), weight=self.class_weights,
                                               ignore_index=IGNORE)
        if out.score is not None:
            has_score = batch.mask & ~torch.isnan(batch.score)
            if has_score.any():
                out.losses["score_l1"] = self.config.score_weight * F.l1_loss(out.score[has_score], batch.score[has_score])
        return out

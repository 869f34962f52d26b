"""Context baseline: a bidirectional GRU over the dialogue per modality, concatenation, classifier.

Not from a paper: the floor that every other model must clear on the same features and protocol.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from erc.data.dialogues import IGNORE, Batch
from erc.models import ModelOutput, ModelSpec, register
from erc.models.blocks import MaskedBiGRU, cross_entropy, score_l1


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
        self.gru = MaskedBiGRU(hidden, hidden)

    def forward(self, x: torch.Tensor, modality_mask: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.gru(self.proj(x) * modality_mask.unsqueeze(-1), mask)


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
        states = [self.encoders[m](batch.features[m], batch.modality_mask[m], batch.mask) for m in self.modalities]
        h = self.trunk(torch.cat(states, dim=-1))  # (B, T, 2H)
        out = ModelOutput(logits=self.classifier(h), extras={"hidden": h})
        if self.score_head is not None:
            out.score = self.score_head(h).squeeze(-1)

        if (batch.labels != IGNORE).any():
            out.losses["ce"] = cross_entropy(out.logits, batch.labels, self.class_weights)
        l1 = score_l1(out.score, batch.score, batch.mask)
        if l1 is not None:
            out.losses["score_l1"] = self.config.score_weight * l1
        return out

"""No-context baseline: each utterance's own features, projected per modality, concatenated, classified.

Not from a paper: the floor below the context baseline (`baseline`), so that the difference between the two is
dialogue context alone. Everything after the per-modality encoders is the baseline's own code (this model
subclasses it): the concatenation, the trunk (Dropout -> Linear -> ReLU -> Dropout), the classifier, the MOSI score
head and the losses (CE with the dataset's class weights, `score_weight` x L1 on the score). Each modality's
encoder is the baseline's projection, Linear -> ReLU -> Dropout, without the GRU after it.

Choices
- No GRU: an utterance's output is a function of its own features only; the other utterances of its dialogue,
  its position and its speaker do not enter (tests/test_model_equations.py checks it).
- Widths: the baseline projects each modality to `hidden` and its bidirectional GRU gives 2 x `hidden` per
  modality. Here the projection gives 2 x `hidden` itself (Linear(D_m -> 2 hidden) -> ReLU -> Dropout), so the
  concatenation, the trunk Linear(2 hidden x M -> 2 hidden), the classifier and the score head have the baseline's
  shapes, at the same `hidden`: what differs is the GRU, replaced by a wider projection. The baseline's GRUs are
  built and dropped before the projections are made, so at one seed the trunk and heads start from the baseline's
  initial weights.
- A missing modality (modality_mask False) enters the concatenation as zeros, as in the baseline; padded
  utterances are zeros too.
- MELD's sentiment labels are not used (the baseline is single-task); no gates.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from erc.models import ModelSpec, register
from erc.models.baseline import BaselineConfig, ContextBaseline


@dataclass
class UtteranceConfig(BaselineConfig):
    """The baseline's fields (hidden 128, dropout 0.3, score_weight 1.0): `hidden` is the baseline's GRU state per
    direction, so the projection is 2 x hidden wide."""


class ModalityProjection(nn.Module):
    """(B, T, D) features of one modality -> (B, T, 2H), each utterance on its own; zeros where the modality is
    missing and at padding. Called as the baseline's ModalityGRU is (x, modality_mask, mask)."""

    def __init__(self, dim: int, hidden: int, dropout: float):
        super().__init__()
        self.proj = nn.Sequential(nn.Linear(dim, 2 * hidden), nn.ReLU(), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, modality_mask: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.proj(x) * (modality_mask & mask).unsqueeze(-1)


@register("utterance")
class UtteranceBaseline(ContextBaseline):
    """The context baseline with each modality's GRU replaced by a per-utterance projection; forward is the
    baseline's."""

    Config = UtteranceConfig

    def __init__(self, config: UtteranceConfig, spec: ModelSpec):
        super().__init__(config, spec)
        self.encoders = nn.ModuleDict({m: ModalityProjection(spec.input_dims[m], config.hidden, config.dropout)
                                       for m in self.modalities})

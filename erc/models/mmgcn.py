"""MMGCN: multimodal fusion by a deep graph convolution network over the dialogue (Hu et al., ACL 2021).

arXiv 2107.06779; official code hujingwen6666/MMGCN @85732d9 (`model.py` DialogueGCNModel with
`graph_type="MMGCN"`, `model_mm.py` MM_GCN, `model_GCN.py` GCNII_lyc, `run.sh`, `train.py`).
Reported weighted F1 (the paper's main results table, on its own features: IEMOCAP text TextCNN 100-d, audio
IS10 1582-d, visual DenseFace 342-d; MELD text 600-d, audio 300-d, visual 342-d; epochs selected on the test
split, see below): IEMOCAP-6 66.22, MELD 58.65. (Checked here through a secondary index of the paper's
benchmarks, wizwand.com; the paper's table itself was not readable from this machine.)

Forward pass, per batch of B dialogues padded to T utterances, M modalities (any non-empty subset of
text/audio/video; sorted, so nodes are ordered audio, text, video):
- modality encoders: text Linear(D -> hidden) then a 2-layer bidirectional LSTM (hidden/2 per direction);
  audio and video Linear(D -> hidden) alone (`av_lstm=True` gives them the LSTM too);
- speaker embedding (`max_speakers` slots) added to the text nodes;
- one graph per dialogue with a node per (utterance, modality): intra-modal edges between every pair of
  utterances of the dialogue (self-loops included), inter-modal edges between the modality nodes of the same
  utterance; edge weight 1 - arccos(0.99999 cos(x_i, x_j)) / pi from the nodes' encoder features; the
  adjacency normalised D^-1/2 A D^-1/2 (D the row sums of A): (B, M*T, M*T), modality-major node order;
- graph network (GCNII*): x -> dropout -> h0 = ReLU(Linear(hidden -> gcn_hidden)); `layers` times
  h <- ReLU(beta_l [A h, h0] W_l + (1 - beta_l)((1 - alpha) A h + alpha h0)) on dropout(h), with
  beta_l = log(lamda / l + 1) and W_l a bias-free (2 gcn_hidden -> gcn_hidden); -> dropout -> [x, h];
- per utterance, its M nodes' [x, h] concatenated (M (hidden + gcn_hidden)) -> dropout -> ReLU -> Linear to the
  classes; loss "ce", cross-entropy (class-weighted where the spec has weights).

Follows the paper
- The graph: fully connected within a modality over the whole dialogue, inter-modal edges only between the
  nodes of one utterance, angular-similarity edge weights, the symmetric normalisation; deep spectral GCN with
  initial residual and identity mapping (GCNII); speaker embeddings on the nodes; the graph outputs of the
  modalities concatenated and classified.

Follows the official code
- Encoders: the run.sh setting (`--base-model LSTM --mm_fusion_mthd concat_subsequently`, `av_using_lstm`
  off): only text goes through the 2-layer BiLSTM (dropout between its layers), audio and video through one
  Linear; no activation after those Linears. Node width 200 (2 D_e), GCN width 100 (graph_h), so the
  classifier sees 300 per modality as the official `smax_fc`.
- Speakers (`use_speaker`): one embedding table, added to the text nodes only, after the LSTM and before the
  adjacency is computed (the similarities see it). `max_speakers` 9 is the official MELD count (IEMOCAP 2).
- Graph: `create_big_adj` of MM_GCN, i.e. full dialogue, NO window (the `--windowp/--windowf 10` flags and
  `--graph_construct` only reach the other graph types); the intra-modal matrix includes each node's
  similarity with itself (1 - arccos(0.99999)/pi, about 0.9986), which is the self-loop; cosines are scaled
  by 0.99999 before arccos (a finite gradient at +-1); the adjacency is built from features that carry
  gradient, as the official code.
- GCNII_lyc with `variant=True`, `lamda` 0.5, `alpha` 0.1, dropout before the input Linear, before every
  layer and after the last, `use_residue`: the (dropped-out) input concatenated to the output; W_l initialised
  uniform(+-1/sqrt(gcn_hidden)). The MMGCN branch hard-codes 64 layers (`nlayers=64`; run.sh's
  `--Deep_GCN_nlayers 4` reaches only the DeepGCN branch): `layers` 64 is the default.
- Head: dropout, ReLU, Linear (`dropout_`, `nn.ReLU()`, `smax_fc`). Dropout 0.4 (run.sh, both datasets).
  Official training (not part of this file): Adam; IEMOCAP lr 3e-4, L2 3e-5, batch 16, 20 epochs, the
  class weights 1/[0.086747, 0.144406, 0.227883, 0.160585, 0.127711, 0.252668] (erc's `sdt_iemocap` policy);
  MELD lr 1e-3, no L2, batch 16, 60 epochs.

Paper and code differ
- The released code selects the epoch with the best TEST F1 (`valid=0.0`, no validation split); erc selects
  on validation only, so the reported figures above are optimistic.

Departs from the official code
- Batched graph: the adjacency is one dense (B, M*T, M*T) tensor per batch (the official code builds one
  (M*N, M*N) matrix over all N utterances of the batch, block by block in Python loops); a padded node has no
  edges and a zero row and column after the normalisation, so real utterances do not see padding. The
  LSTM runs on the real utterances only (packed; the official one runs over the padding too).
- MELD: the official MELD run trains with its own focal loss (gamma 2.5, taken over every class of the
  log-probabilities); erc uses cross-entropy on every dataset, the loss of the official IEMOCAP run.

Choices where neither says
- Any subset of modalities: M modalities give M node sets; with one (EmoryNLP, text only) the graph is the
  intra-modal one alone. Where the spec has no text, the speaker embedding goes to every modality's nodes
  (`speaker_modalities="text"`); `"all"` adds it to every modality always.
- A missing modality for an utterance (modality_mask False): its node is dropped: zero features, no edges
  (no self-loop either), and a zero block in the utterance's concatenated output, so its features change
  nothing. The utterance keeps the nodes of the modalities it has.
- MOSI score: Linear(-> 1) on the same features as the classifier, L1 loss weighted by `score_weight` (as the
  baseline). MELD's sentiment labels are not used: MMGCN is single-task.
- `hidden` must be even (the BiLSTM's two directions).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from erc.data.dialogues import IGNORE, Batch
from erc.models import ModelOutput, ModelSpec, register
from erc.models.blocks import Dropout, cross_entropy, packed_rnn, score_l1


@dataclass
class MMGCNConfig:
    hidden: int = 200  # node width: every modality's encoder output (official 2 D_e)
    gcn_hidden: int = 100  # GCNII width (official graph_h)
    layers: int = 64  # GCNII layers (the official MMGCN branch's fixed 64)
    alpha: float = 0.1  # initial residual: the share of h0 in every layer
    lamda: float = 0.5  # identity mapping: beta_l = log(lamda / l + 1)
    lstm_layers: int = 2  # the text encoder's BiLSTM
    av_lstm: bool = False  # audio and video through a BiLSTM too (official av_using_lstm: off)
    dropout: float = 0.4  # GCN input, every layer, GCN output, before the head, between LSTM layers
    max_speakers: int = 9  # speaker embedding slots; higher per-dialogue indices share the last one
    speaker_modalities: Literal["text", "all"] = "text"  # nodes that get the speaker embedding (see docstring)
    score_weight: float = 1.0  # weight of the L1 regression loss where the dataset has a score


ANGLE_SCALE = 0.99999  # the official scaling of cosines before arccos (a finite gradient at +-1)


def angular_similarity(cos: torch.Tensor) -> torch.Tensor:
    return 1 - torch.acos(cos * ANGLE_SCALE) / math.pi


def normalized_adjacency(nodes: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """D^-1/2 A D^-1/2 of the dialogue graphs. nodes (B, M, T, d), valid (B, M, T) bool -> (B, M*T, M*T), node
    m*T + t = utterance t in modality m. A: angular similarity between every two valid nodes of one modality
    (self-loops included) and between the valid nodes of one utterance; zero elsewhere (invalid rows/columns)."""
    with torch.autocast(nodes.device.type, enabled=False):  # in bf16 0.99999 rounds to 1: acos' gradient is -inf
        return _normalized_adjacency(nodes.float(), valid)


def _normalized_adjacency(nodes: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    B, M, T, _ = nodes.shape
    unit = F.normalize(nodes, dim=-1)
    intra = angular_similarity(torch.einsum("bmtd,bmsd->bmts", unit, unit))  # (B, M, T, T)
    inter = angular_similarity(torch.einsum("bmtd,bntd->bmnt", unit, unit))  # (B, M, M, T)
    same_modality = torch.eye(M, dtype=nodes.dtype, device=nodes.device)
    same_utterance = torch.eye(T, dtype=nodes.dtype, device=nodes.device)
    adj = (intra.unsqueeze(3) * same_modality.view(1, M, 1, M, 1)  # (B, M, T, M, T)
           + inter.transpose(2, 3).unsqueeze(-1) * (1 - same_modality).view(1, M, 1, M, 1)
           * same_utterance.view(1, 1, T, 1, T))
    v = valid.reshape(B, M * T)
    adj = adj.reshape(B, M * T, M * T) * (v.unsqueeze(2) & v.unsqueeze(1)).to(nodes.dtype)
    degree = adj.sum(-1)  # a valid node's self-loop keeps it > 0
    scale = torch.where(v, degree.clamp(min=torch.finfo(degree.dtype).tiny).rsqrt(), torch.zeros_like(degree))
    return scale.unsqueeze(2) * adj * scale.unsqueeze(1)


class GCNIILayer(nn.Module):
    """One GCNII* layer (before its ReLU): beta [A h, h0] W + (1 - beta)((1 - alpha) A h + alpha h0)."""

    def __init__(self, dim: int, alpha: float, beta: float):
        super().__init__()
        self.alpha, self.beta = alpha, beta
        self.weight = nn.Linear(2 * dim, dim, bias=False)
        bound = 1 / math.sqrt(dim)  # the official init
        nn.init.uniform_(self.weight.weight, -bound, bound)

    def forward(self, h: torch.Tensor, adj: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:
        """h, h0: (B, N, dim); adj: (B, N, N)."""
        propagated = torch.bmm(adj, h)
        mixed = (1 - self.alpha) * propagated + self.alpha * h0
        return self.beta * self.weight(torch.cat([propagated, h0], dim=-1)) + (1 - self.beta) * mixed


class MaskedBiLSTM(nn.Module):
    """Bidirectional LSTM over the real utterances only (packed), zeros at padded positions. (B,T,D)->(B,T,D)."""

    def __init__(self, dim: int, layers: int, dropout: float):
        super().__init__()
        self.lstm = nn.LSTM(dim, dim // 2, num_layers=layers, batch_first=True, bidirectional=True,
                            dropout=dropout if layers > 1 else 0.0)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return packed_rnn(self.lstm, x, mask)


@register("mmgcn")
class MMGCN(nn.Module):
    """Batch -> logits (B, T, C) from a deep GCN over (utterance, modality) nodes; loss "ce" (+ "score_l1")."""

    Config = MMGCNConfig

    def __init__(self, config: MMGCNConfig, spec: ModelSpec):
        super().__init__()
        if config.hidden % 2:
            raise ValueError(f"mmgcn: hidden must be even (two LSTM directions), got {config.hidden}")
        self.config, self.spec = config, spec
        self.modalities = sorted(spec.input_dims)
        h, g, M = config.hidden, config.gcn_hidden, len(self.modalities)
        self.project = nn.ModuleDict({m: nn.Linear(spec.input_dims[m], h) for m in self.modalities})
        self.lstm = nn.ModuleDict({m: MaskedBiLSTM(h, config.lstm_layers, config.dropout) for m in self.modalities
                                   if m == "text" or config.av_lstm})
        self.speaker = nn.Embedding(config.max_speakers, h)
        self.speaker_modalities = [m for m in self.modalities if config.speaker_modalities == "all" or m == "text"] \
            or list(self.modalities)
        self.dropout = Dropout(config.dropout)
        self.gcn_input = nn.Linear(h, g)
        self.gcn = nn.ModuleList([GCNIILayer(g, config.alpha, math.log(config.lamda / layer + 1))
                                  for layer in range(1, config.layers + 1)])
        self.classifier = nn.Linear(M * (h + g), spec.num_classes)
        self.score_head = nn.Linear(M * (h + g), 1) if spec.has_score else None
        weights = torch.tensor(spec.class_weights, dtype=torch.float32) if spec.class_weights else None
        self.register_buffer("class_weights", weights, persistent=False)

    def graph(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The nodes' encoder features (B, M, T, hidden), which nodes exist (B, M, T), the normalised adjacency."""
        mask = batch.mask
        speakers = self.speaker(batch.speakers.clamp(0, self.config.max_speakers - 1))  # (B, T, h)
        nodes, valid = [], []
        for m in self.modalities:
            present = mask & batch.modality_mask[m]
            x = self.project[m](batch.features[m]) * present.unsqueeze(-1).to(speakers.dtype)
            if m in self.lstm:
                x = self.lstm[m](x, mask)
            if m in self.speaker_modalities:
                x = x + speakers
            nodes.append(x * present.unsqueeze(-1).to(x.dtype))
            valid.append(present)
        nodes, valid = torch.stack(nodes, dim=1), torch.stack(valid, dim=1)  # (B, M, T, h), (B, M, T)
        return nodes, valid, normalized_adjacency(nodes, valid)

    def forward(self, batch: Batch) -> ModelOutput:
        cfg = self.config
        nodes, valid, adj = self.graph(batch)
        B, M, T, h = nodes.shape

        # GCNII over the B graphs of M*T nodes each.
        x = self.dropout(nodes.reshape(B, M * T, h))
        h0 = F.relu(self.gcn_input(x))
        state = h0
        for layer in self.gcn:
            state = F.relu(layer(self.dropout(state), adj, h0))
        state = self.dropout(state)
        out = torch.cat([x, state], dim=-1) * valid.reshape(B, M * T, 1).to(x.dtype)  # a dropped node: zeros

        # Each utterance: its modalities' node outputs side by side -> dropout -> ReLU -> heads.
        fused = F.relu(self.dropout(out.view(B, M, T, -1).permute(0, 2, 1, 3).reshape(B, T, -1)))
        result = ModelOutput(logits=self.classifier(fused))
        if self.score_head is not None:
            result.score = self.score_head(fused).squeeze(-1)
        if (batch.labels != IGNORE).any():
            result.losses["ce"] = cross_entropy(result.logits, batch.labels, self.class_weights)
        l1 = score_l1(result.score, batch.score, batch.mask)
        if l1 is not None:
            result.losses["score_l1"] = cfg.score_weight * l1
        return result

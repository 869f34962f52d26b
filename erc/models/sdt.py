"""SDT: transformer-based model with self-distillation (Ma et al., IEEE TMM 2024).

arXiv 2310.20494; official code butterfliesss/SDT @60af921. Reported weighted F1 (test-selected epochs, see
below): IEMOCAP-6 74.08, MELD 66.60.

Follows the paper
- Each modality's utterance features are projected to a common hidden size and given utterance-position and
  speaker embeddings.
- Intra-modal transformers (query = key = value = one modality) and inter-modal transformers (query = the
  target modality, key/value = a source modality) over the utterances of the dialogue: with the paper's three
  modalities, 3 intra + 6 inter encoders.
- Hierarchical gated fusion: a unimodal gate on every encoder output, then a multimodal gate that weights the
  modalities of each utterance.
- Self-distillation: the fused (multimodal) prediction is the teacher; each modality has its own classifier that
  learns from the hard labels (cross-entropy) and from the teacher's soft labels (KL at temperature T).
  Loss = γ1·CE(fused) + γ2·Σ_m CE(m) + γ3·Σ_m KL(softmax(z_fused/T) ‖ softmax(z_m/T)), with γ = 1, 1, 1.

Follows the official code
- Conv1d with kernel 1 and no bias per modality, to hidden 1024.
- Encoder layer (`encoder_norm="pre_ff"`, the shared AttentionBlock's form of it): the official one-layer encoder,
  no LayerNorm around the attention, a LayerNorm (eps 1e-6) before the feed-forward, GELU (tanh form), no final
  LayerNorm. `encoder_norm="post"` is the post-norm ReLU layer erc used until 2026-12-04 (LayerNorm after each
  residual); on IEMOCAP at the official configuration, selected on validation (one seed), the two differ by
  0.5 points (validation 61.24 post, 60.76 pre_ff; test 61.16, 60.84): within a seed's spread.
- Fixed sine/cosine positions plus a learned speaker embedding are added to each encoder's inputs, then dropout
  (drawn separately for every encoder, as each official encoder applies its own).
- One-layer encoders, 8 heads, feed-forward 1024 (equal to the hidden size); dropout 0.5 everywhere, the
  attention weights included.
- Unimodal gate σ(W x) ⊙ x with W bias-free. `freeze_unimodal_gate=True` is the official MELD setting
  (W fixed to the identity, i.e. σ(x) ⊙ x); the official IEMOCAP setting (learned W) is the default.
- Per target modality: its intra-modal output and its inter-modal outputs (intra first) are concatenated and
  reduced by Linear(M·h → h).
- Multimodal gate: one bias-free W shared by the modalities; softmax of W·h_m across the modalities, taken per
  hidden unit; the fused representation is the weighted sum of the h_m.
- Heads: ReLU-Dropout-Linear per modality, a plain Linear for the fused representation; the prediction is the
  fused head's.
- KL: kl_div(log_softmax(z_m/T), softmax(z_fused/T)) summed over classes and averaged over all real utterances
  (the official utterance mask: labelled or not); no T² factor by default (`kl_t_squared=False`).
- Class-weighted CE is the weighted mean Σ w_y·nll / Σ w_y (the official weighted NLL). The official
  IEMOCAP weights are 1/[0.086747, 0.144406, 0.227883, 0.160585, 0.127711, 0.252668], in the COSMIC label
  order hap, sad, neu, ang, exc, fru, which is erc's IEMOCAP order too. erc's class weights are a dataset's
  policy for every model alike (none by default); those are the named policy `sdt_iemocap`
  (erc.training.config.CLASS_WEIGHTS), for the variant that reproduces the official setting (the model uses
  spec.class_weights whenever given). MELD is unweighted.
- Defaults: temperature 1 (official IEMOCAP; the official MELD runs use 8), `max_speakers` 9 (the official
  MELD speaker count; IEMOCAP has 2). Official training (not part of this file): Adam, weight decay 1e-5;
  IEMOCAP lr 1e-4, batch 16, 150 epochs; MELD lr 5e-6, batch 8, 50 epochs.

Paper and code differ
- The paper transfers knowledge from the fused teacher to the modalities; the released code does not detach the
  teacher, so the KL terms also pull the fused output towards the unimodal ones. Worse, it multiplies the
  target probabilities by the padding mask, and the KL gradient at a zero target is log 0: NaN from the first
  step on current PyTorch (measured for erc on the released code). Here the teacher is DETACHED by default
  (`detach_teacher=True`), the paper's one-way reading; `detach_teacher=False` gives the released code's
  two-way gradient, which stays finite here because padded utterances are dropped before the KL.
- The released code picks the epoch with the best TEST F1, with no validation split and no seed; erc selects on
  validation only, so the reported figures above are optimistic.

Departs from the official code
- Padding: every layer runs on the real utterances only (packed), the attention alone on the padded dialogue
  with padded keys masked (as the official -1e10 fill), so real utterances do not depend on padding and no time
  goes into it; the official padding slot of the speaker embedding is not needed. The outputs at padded
  positions are zeros (the gate there is uniform); no loss sees them.
- Speakers: erc gives a per-dialogue speaker index by first appearance (`train.speakers: appearance`); the
  official IEMOCAP loader indexes by gender (male 0, female 1 in every dialogue), which is `train.speakers: name`
  on IEMOCAP (its speakers are Female and Male: the same two groups, indices swapped, which a randomly initialised
  embedding does not see), set by the paper entry. The embedding has `max_speakers`
  slots; an index at or beyond the last slot shares it (clamped), so dialogues with more speakers than
  slots still run (MELD's training dialogues have at most 9 speakers, IEMOCAP's 2).

Choices where neither says
- Any subset of text/audio/video: M modalities give M intra + M(M−1) inter encoders and Linear(M·h → h)
  reductions. With ONE modality there is only its intra encoder and nothing to distil: no inter encoders, no
  multimodal gate (a softmax over one modality is 1), no unimodal head, no CE(m) and no KL; the fused head on
  the reduced representation is the model (loss = γ1·CE).
- A missing modality for an utterance (modality_mask False) enters as zero features (the kernel-1 convolution
  is masked by the modality mask); the utterance still takes part in attention through its position and
  speaker embeddings, so a dialogue without a modality still has keys to attend to.
  The multimodal gate gives that modality no weight: its softmax runs over the modalities the utterance has
  (an utterance with none keeps them all), so the fused state comes from the modalities it really has.
- MOSI score: Linear(h → 1) on the fused representation, L1 loss weighted by `score_weight` (as the baseline).
- MELD's sentiment labels are not used: SDT is single-task.
- `extras["gate"]` is the multimodal gate (B, T, M): the per-unit softmax weights averaged over the hidden
  units (it still sums to 1 over the modalities); `extras["logits_<m>"]` are the unimodal heads' logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from erc.data.dialogues import IGNORE, Batch
from erc.models import Gates, ModelOutput, ModelSpec, register
from erc.models.blocks import (AttentionBlock, Dropout, MaskedConv1d, Packing, cross_entropy, kl_distill, score_l1,
                               sinusoidal_positions)


@dataclass
class SDTConfig:
    hidden: int = 1024  # projection and transformer width
    heads: int = 8
    ff_dim: int = 1024  # transformer feed-forward width
    dropout: float = 0.5  # inputs, attention weights, residual branches, unimodal heads
    max_speakers: int = 9  # speaker embedding slots; higher per-dialogue indices share the last one
    temperature: float = 1.0  # self-distillation T (official: IEMOCAP 1, MELD 8)
    gamma1: float = 1.0  # weight of CE on the fused prediction
    gamma2: float = 1.0  # weight of the unimodal CE terms
    gamma3: float = 1.0  # weight of the KL self-distillation terms
    detach_teacher: bool = True  # official code: False (NaN with its padding); see the module docstring
    kl_t_squared: bool = False  # multiply the KL by T² (Hinton et al.); official code: no
    freeze_unimodal_gate: bool = False  # official MELD: True (gate weight fixed to the identity)
    encoder_norm: Literal["pre_ff", "post"] = "pre_ff"  # the official encoder layer; post: the shared post-norm layer
    score_weight: float = 1.0  # weight of the L1 regression loss where the dataset has a score


class UnimodalGate(nn.Module):
    """σ(W x) ⊙ x with a bias-free W; `frozen` fixes W to the identity (the official MELD setting)."""

    def __init__(self, dim: int, frozen: bool):
        super().__init__()
        self.fc = nn.Linear(dim, dim, bias=False)
        if frozen:
            with torch.no_grad():
                self.fc.weight.copy_(torch.eye(dim))
            self.fc.weight.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.fc(x)) * x


class MultimodalGate(nn.Module):
    """Softmax across modalities of a shared bias-free W·h_m (per hidden unit), then the weighted sum."""

    def __init__(self, dim: int):
        super().__init__()
        self.fc = nn.Linear(dim, dim, bias=False)

    def forward(self, states: torch.Tensor, present: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """states (..., M, h); present (..., M) bool, the modalities that may get weight."""
        present = present | ~present.any(-1, keepdim=True)  # none present: all of them
        weights = self.fc(states).masked_fill(~present.unsqueeze(-1), float("-inf")).softmax(dim=-2)  # (..., M, h)
        return (weights * states).sum(-2), weights  # (..., h), (..., M, h)


@register("sdt")
class SDT(nn.Module):
    """Batch -> fused logits (B, T, C), unimodal logits and gate in extras, named loss terms."""

    Config = SDTConfig

    def __init__(self, config: SDTConfig, spec: ModelSpec):
        super().__init__()
        self.config, self.spec = config, spec
        self.modalities = sorted(spec.input_dims)
        h, M = config.hidden, len(self.modalities)
        # Source modalities per target modality: itself first (intra-modal), then the others (inter-modal).
        self.sources = {t: [t] + [s for s in self.modalities if s != t] for t in self.modalities}
        names = [f"{s}_{t}" for t in self.modalities for s in self.sources[t]]  # "audio_text": audio -> text

        self.project = nn.ModuleDict({m: MaskedConv1d(spec.input_dims[m], h, kernel_size=1, bias=False)
                                      for m in self.modalities})
        self.speaker = nn.Embedding(config.max_speakers, h)
        self.input_dropout = Dropout(config.dropout)
        self.encoders = nn.ModuleDict({n: AttentionBlock(h, config.heads, ff_dim=config.ff_dim, dropout=config.dropout,
                                                         attn_dropout=config.dropout, norm=config.encoder_norm)
                                       for n in names})
        self.unimodal_gates = nn.ModuleDict({n: UnimodalGate(h, config.freeze_unimodal_gate) for n in names})
        self.reduce = nn.ModuleDict({m: nn.Linear(M * h, h) for m in self.modalities})
        self.multimodal_gate = MultimodalGate(h) if M > 1 else None
        self.modality_heads = nn.ModuleDict({m: nn.Sequential(nn.ReLU(), Dropout(config.dropout),
                                                              nn.Linear(h, spec.num_classes))
                                             for m in self.modalities} if M > 1 else {})
        self.fused_head = nn.Linear(h, spec.num_classes)
        self.score_head = nn.Linear(h, 1) if spec.has_score else None
        weights = torch.tensor(spec.class_weights, dtype=torch.float32) if spec.class_weights else None
        self.register_buffer("class_weights", weights, persistent=False)

    def gates(self, batch: Batch, out: ModelOutput) -> dict[str, Gates]:
        """The multimodal gate over the modalities (averaged over the hidden units); none with one modality."""
        if self.multimodal_gate is None:
            return {}
        return {"modality_gate": Gates(list(self.modalities), out.extras["gate"], batch.mask)}

    def forward(self, batch: Batch) -> ModelOutput:
        cfg, mask = self.config, batch.mask
        T = mask.shape[1]

        # Inputs: kernel-1 projection (zero where the modality is missing) + positions + speakers, at the N real
        # utterances only (packed): everything but the encoders' attention runs on them.
        real = Packing(mask)
        speakers = batch.speakers.clamp(0, cfg.max_speakers - 1)
        context = real.pack(sinusoidal_positions(T, cfg.hidden, device=mask.device) + self.speaker(speakers))  # (N, h)
        inputs = {m: self.project[m].forward_packed(real.pack(batch.features[m]), real.pack(batch.modality_mask[m]))
                  + context for m in self.modalities}

        # Intra- and inter-modal transformers, unimodal gates, reduction per target modality.
        states = []
        for t in self.modalities:
            outs = []
            for s in self.sources[t]:
                name = f"{s}_{t}"
                query = self.input_dropout(inputs[t])
                source = query if s == t else self.input_dropout(inputs[s])
                outs.append(self.unimodal_gates[name](self.encoders[name].forward_packed(query, source, real)))
            states.append(self.reduce[t](torch.cat(outs, dim=-1)))  # (N, h)
        states = torch.stack(states, dim=-2)  # (N, M, h)

        # Multimodal gate and heads; outputs back in the padded layout (padded utterances: zeros, a uniform gate).
        if self.multimodal_gate is not None:
            present = torch.stack([real.pack(batch.modality_mask[m]) for m in self.modalities], dim=-1)  # (N, M)
            fused, gate = self.multimodal_gate(states, present)  # (N, h), (N, M, h)
        else:
            fused, gate = states[:, 0], torch.ones_like(states)
        out = ModelOutput(logits=real.unpack(self.fused_head(fused)),  # (B, T, C)
                          extras={"gate": real.unpack(gate.mean(-1), fill=1 / len(self.modalities))})  # (B, T, M)
        unimodal = {m: real.unpack(self.modality_heads[m](states[:, i]))
                    for i, m in enumerate(self.modalities) if m in self.modality_heads}
        out.extras.update({f"logits_{m}": z for m, z in unimodal.items()})
        if self.score_head is not None:
            out.score = real.unpack(self.score_head(fused).squeeze(-1))

        # Loss: γ1·CE(fused) + γ2·Σ CE(m) + γ3·Σ KL(teacher = fused ‖ student = m), each term named.
        if (batch.labels != IGNORE).any():
            out.losses["ce_fused"] = cfg.gamma1 * cross_entropy(out.logits, batch.labels, self.class_weights)
            for m, z in unimodal.items():
                out.losses[f"ce_{m}"] = cfg.gamma2 * cross_entropy(z, batch.labels, self.class_weights)
        for m, z in unimodal.items():
            out.losses[f"kl_{m}"] = cfg.gamma3 * kl_distill(z, out.logits, mask, temperature=cfg.temperature,
                                                            detach_teacher=cfg.detach_teacher,
                                                            t_squared=cfg.kl_t_squared)
        l1 = score_l1(out.score, batch.score, mask)
        if l1 is not None:
            out.losses["score_l1"] = cfg.score_weight * l1
        return out

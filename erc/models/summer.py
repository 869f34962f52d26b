"""SUMMER: sparse dynamic mixture of experts, hierarchical cross-modal fusion, interactive knowledge distillation.

Jiagen Li, Rui Yu, Huihao Huang, Huaicheng Yan, "Unimodal-driven Distillation in Multimodal Emotion Recognition
with Dynamic Fusion", ICME 2025 (arXiv 2503.23721). No public code; the paper's public material names the three
components and the form of the distillation loss, and publishes none of the equations or hyper-parameters below
the component level. Everything under "Choices where neither says" is ours.

Pipeline, per dialogue: each modality is projected to a common width and given positions and speakers; a
transformer layer per modality runs self-attention over the dialogue whose attention scores get a bias from a
sparse mixture of experts (SDMoE); HCMF fuses the modalities pairwise, then over the pairs; a dialogue-level
layer and a linear classifier follow. With `teacher_checkpoint`, a frozen text-only model (the registered
"baseline", trained first as its own stage) guides the student through IKD.

Follows the paper
- Modalities text, audio and video; here any non-empty subset of them (HCMF pairs exist only with two or more).
- SDMoE: an auxiliary expert network plus a dynamic router that adjusts the relevance of the attention map for
  local token-wise interactions. Here the "tokens" are a dialogue's utterances: each expert scores every
  (query, key) pair of utterances per head, the router picks the top-k experts per query utterance, and the
  gate-weighted expert scores are added to the dialogue self-attention's scores (`attn_bias`).
- HCMF: multi-level hierarchical cross-modal fusion: level 1 fuses every pair of modalities, level 2 fuses the
  pairs (with the unimodal states) into one state per utterance.
- IKD: a pre-trained, frozen unimodal teacher guides the multimodal student in latent and logit space; the
  student loss is CE + kappa1 * L_cross^KD + kappa2 * L_align^Label + kappa3 * L_smooth^Label (loss terms
  "ce", "kd_cross", "align", "smooth").

Follows the official code
- There is no official code.

Paper and code differ
- Not applicable (no code).

Choices where neither says
- Width, heads, feed-forward size, dropout: hidden 1024, 8 heads, feed-forward 1024, dropout 0.5, one layer per
  stage, as in SDT (Ma et al., TMM 2024), the model SUMMER is positioned against and evaluated beside on the
  same IEMOCAP and MELD features. These are large for CPU: params.yaml should override them (see the report).
- Utterance inputs: a per-modality Linear to the width, zeroed where the modality is missing for an utterance,
  plus sinusoidal positions and a learned speaker embedding (SDT's input layer; speaker indices above
  `max_speakers - 1` share the last embedding).
- SDMoE experts: 4 experts, top-2 routing (the common sparse-MoE setting, Shazeer et al. 2017; GShard). Expert
  e scores query utterance i against key j, per head h, as a low-rank bilinear form
  (U_e x_i)_h . (V_e x_j)_h / sqrt(r) (rank r = 16) plus a learned relative-position bias b_e[h, clip(i - j,
  -w, w)] with window w = 3: the "local" part (utterances further than 3 turns share one bias per direction).
  Router: softmax(W_r x_i) over experts, keep the top-k, renormalise; the attention bias of row i is
  sum_e g_ie * score_e(i, .). All experts are computed densely and the gates are sparse (the experts are small,
  so dispatching would cost more than it saves). The bias acts on intra-modal self-attention only; the
  cross-modal attention of HCMF is plain.
- Router balance: the Switch-Transformer load-balancing loss E * sum_e f_e * P_e (f_e: share of top-k slots
  given to expert e, P_e: mean router probability, both over real utterances), averaged over modalities and
  layers, weight 0.01 (Switch's value); loss term "balance". Router gates are in `extras["router.<modality>.<layer>"]`
  (B, T, E), zero for unselected experts.
- HCMF level 1, for each modality pair (a, b): cross-attention a<-b and b<-a (query one modality, key/value the
  other, residual + LayerNorm + feed-forward, the shared AttentionBlock), then
  z_ab = LayerNorm(ReLU(W_ab [c_a<-b ; c_b<-a])). Level 2: the M unimodal states and the P pair states of an
  utterance are K = M + P tokens, pooled by attention: alpha = softmax_K(w . tanh(W z_k)), fused = sum_k alpha_k z_k
  (weights in `extras["hcmf_weights"]` (B, T, K), token order in `model.fusion_tokens`). A dialogue-level
  self-attention layer then gives the student state s (the penultimate, `extras["hidden"]`). With a single
  modality there are no pairs and the pooling has one token (weight 1).
- Missing modality for an utterance: its projected features are zero (like the baseline); attention masks cover
  padding only, so a dialogue whose audio is missing on some turns still attends over all of its turns.
- IKD teacher: the registered "baseline" (a BiGRU over the text), trained on text only and saved by
  erc.models.checkpoint.save_checkpoint; `teacher_checkpoint` names that directory. The teacher is a frozen submodule
  (requires_grad False, always in eval mode, run under no_grad on the batch restricted to "text"), so the
  student's checkpoint holds its weights; loading that checkpoint builds the teacher from the directory again
  and then overwrites it with the saved weights (so the directory must still exist when loading). Its input
  dims must be exactly {"text": student's text dim} and its classes the student's.
- IKD without a teacher (`teacher_checkpoint` None) or without a "text" modality: the IKD terms are absent and
  the teacher is not loaded (the loss is CE + balance [+ score L1]).
- IKD positions: real utterances whose text is present (the teacher's input); label terms also need a label.
- L_cross^KD (latent): cosine distance 1 - cos(P s, h_t) between a learned projection P (Linear, width -> the
  teacher's hidden width) of the student state and the teacher's penultimate state h_t, averaged over
  utterances. Cosine rather than MSE because it ignores the teacher's activation scale; `latent_loss: mse`
  switches to the FitNets-style mean squared error.
- L_align^Label: KL(softmax(z_t / T) || softmax(z_s / T)) * T^2 (Hinton et al., 2015), temperature T = 2.
- L_smooth^Label: cross-entropy against (1 - eps) * onehot(y) + eps * softmax(z_t / T), eps = 0.1 (the usual
  label-smoothing mass, with the teacher's softened distribution in place of the uniform one); weighted by the
  class weights of the labels where the dataset has class weights, like the CE term.
- kappa1 = kappa2 = kappa3 = 1 (equal weights, as SDT's gamma).
- "Interactive" is read as the teacher-student interaction through the three IKD terms; the teacher itself is
  never updated (the paper calls it pre-trained and frozen).
- `teacher_checkpoint` should be an absolute path: Ray Train workers do not run in the driver's working
  directory. The teacher also runs at evaluation time (its logits are in `extras["teacher_logits"]`), which
  costs one BiGRU pass per batch.
- Optimiser, schedule, epochs: not published; erc's training loop and params.yaml decide them.
- MOSI: a linear score head on s with the L1 term (weight 1), as the baseline. A second sentiment task (MELD) is
  not modelled (the paper reports emotion recognition only).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from erc.data.dialogues import IGNORE, Batch
from erc.models import Gates, ModelOutput, ModelSpec, register
from erc.models.blocks import (AttentionBlock, cross_entropy, kl_distill, load_balance, score_l1, sinusoidal_positions,
                               top_k_gates)
from erc.models.checkpoint import load_checkpoint

MODALITIES = ("text", "audio", "video")


@dataclass
class SummerConfig:
    hidden: int = 1024  # model width (choice: SDT's)
    heads: int = 8
    ff_dim: int = 1024  # feed-forward width of every attention layer
    dropout: float = 0.5
    sdmoe_layers: int = 1  # SDMoE self-attention layers per modality
    num_experts: int = 4
    top_k: int = 2
    expert_rank: int = 16  # rank of each expert's per-head bilinear score
    local_window: int = 3  # relative distances beyond this share one bias per direction
    balance_weight: float = 0.01  # router load-balancing loss (Switch Transformer)
    max_speakers: int = 16
    score_weight: float = 1.0  # L1 regression weight where the dataset has a score
    # IKD
    teacher_checkpoint: str | None = None  # directory written by erc.models.checkpoint.save_checkpoint (text-only model)
    kappa_cross: float = 1.0  # kappa1: latent KD
    kappa_align: float = 1.0  # kappa2: logit KL
    kappa_smooth: float = 1.0  # kappa3: teacher-derived label smoothing
    temperature: float = 2.0
    t_squared: bool = True  # multiply the KL by T^2 (Hinton et al., 2015)
    smooth_mix: float = 0.1  # eps: mass of the teacher's softened distribution in the smoothed target
    latent_loss: str = "cosine"  # "cosine" or "mse"


# ---------------------------------------------------------------- SDMoE


class SparseDynamicMoE(nn.Module):
    """Experts that score utterance pairs, routed per query utterance: the attention bias of SDMoE.

    forward(x (B, T, D), mask (B, T)) -> bias (B, heads, T, T), gates (B, T, E), probs (B, T, E).
    """

    def __init__(self, dim: int, *, heads: int, num_experts: int, top_k: int, rank: int, window: int):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in 1..num_experts, got {top_k} of {num_experts}")
        self.heads, self.num_experts, self.top_k, self.rank, self.window = heads, num_experts, top_k, rank, window
        self.router = nn.Linear(dim, num_experts)
        self.query = nn.Linear(dim, num_experts * heads * rank, bias=False)
        self.key = nn.Linear(dim, num_experts * heads * rank, bias=False)
        self.relative = nn.Parameter(torch.zeros(num_experts, heads, 2 * window + 1))

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return top_k_gates(self.router(x), self.top_k)  # (B, T, E) each

    def forward(self, x: torch.Tensor, mask: torch.Tensor):
        B, T, _ = x.shape
        E, H, r = self.num_experts, self.heads, self.rank
        gates, probs = self.route(x)
        q = self.query(x).view(B, T, E, H, r)
        k = self.key(x).view(B, T, E, H, r)
        content = torch.einsum("biehr,bjehr->behij", q, k) / math.sqrt(r)  # (B, E, H, T, T)
        pos = torch.arange(T, device=x.device)
        offset = (pos[:, None] - pos[None, :]).clamp(-self.window, self.window) + self.window  # (T, T)
        local = self.relative[:, :, offset]  # (E, H, T, T)
        bias = torch.einsum("bie,behij->bhij", gates, content) + torch.einsum("bie,ehij->bhij", gates, local)
        return bias, gates, probs


class SDMoELayer(nn.Module):
    """Dialogue self-attention of one modality whose scores get the SDMoE bias; then feed-forward."""

    def __init__(self, config: SummerConfig):
        super().__init__()
        c = config
        self.moe = SparseDynamicMoE(c.hidden, heads=c.heads, num_experts=c.num_experts, top_k=c.top_k,
                                    rank=c.expert_rank, window=c.local_window)
        self.attention = AttentionBlock(c.hidden, c.heads, ff_dim=c.ff_dim, dropout=c.dropout,
                                        attn_dropout=c.dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor):
        bias, gates, probs = self.moe(x, mask)
        return self.attention(x, x, mask, attn_bias=bias), gates, probs


# ---------------------------------------------------------------- HCMF


class PairFusion(nn.Module):
    """HCMF level 1 for modalities (a, b): a<-b and b<-a cross-attention, then a fused pair state."""

    def __init__(self, config: SummerConfig):
        super().__init__()
        c = config
        self.a_from_b = AttentionBlock(c.hidden, c.heads, ff_dim=c.ff_dim, dropout=c.dropout, attn_dropout=c.dropout)
        self.b_from_a = AttentionBlock(c.hidden, c.heads, ff_dim=c.ff_dim, dropout=c.dropout, attn_dropout=c.dropout)
        self.fuse = nn.Sequential(nn.Linear(2 * c.hidden, c.hidden), nn.ReLU(), nn.Dropout(c.dropout),
                                  nn.LayerNorm(c.hidden))

    def forward(self, a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        pair = torch.cat([self.a_from_b(a, b, mask), self.b_from_a(b, a, mask)], dim=-1)
        return self.fuse(pair) * mask.unsqueeze(-1).to(a.dtype)


class TokenPooling(nn.Module):
    """HCMF level 2: attention pooling over the K unimodal and pair states of each utterance."""

    def __init__(self, dim: int):
        super().__init__()
        self.project = nn.Linear(dim, dim)
        self.score = nn.Linear(dim, 1, bias=False)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # (B, T, K, D)
        weights = self.score(torch.tanh(self.project(tokens))).squeeze(-1).softmax(-1)  # (B, T, K)
        return (weights.unsqueeze(-1) * tokens).sum(2), weights


# ---------------------------------------------------------------- IKD helpers


def text_only(batch: Batch) -> Batch:
    """The batch as the text-only teacher sees it."""
    return Batch({"text": batch.features["text"]}, {"text": batch.modality_mask["text"]}, batch.mask,
                 batch.speakers, batch.labels, batch.sentiment, batch.score, batch.rows)


def load_teacher(directory: str, text_dim: int, num_classes: int) -> nn.Module:
    teacher, info = load_checkpoint(directory)
    dims = info["spec"]["input_dims"]
    if dims != {"text": text_dim}:
        raise ValueError(f"SUMMER teacher {directory}: input dims {dims}, expected {{'text': {text_dim}}}")
    if info["spec"]["num_classes"] != num_classes:
        raise ValueError(f"SUMMER teacher {directory}: {info['spec']['num_classes']} classes, expected {num_classes}")
    teacher.requires_grad_(False)
    return teacher.eval()


def teacher_width(teacher: nn.Module, text_dim: int) -> int:
    """Width of the teacher's `extras["hidden"]`, read off one dummy utterance."""
    one = torch.ones(1, 1, dtype=torch.bool)
    batch = Batch({"text": torch.zeros(1, 1, text_dim)}, {"text": one}, one, torch.zeros(1, 1, dtype=torch.long),
                  torch.full((1, 1), IGNORE), torch.full((1, 1), IGNORE), torch.full((1, 1), float("nan")),
                  torch.zeros(1, 1, dtype=torch.long))
    with torch.no_grad():
        return teacher(batch).extras["hidden"].shape[-1]


LATENT_LOSSES = {  # per utterance: (N, D), (N, D) -> (N,)
    "cosine": lambda student, teacher: 1.0 - F.cosine_similarity(student, teacher, dim=-1),
    "mse": lambda student, teacher: (student - teacher).pow(2).mean(-1),
}


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of -sum_c target_c log p_c over N rows; logits, target (N, C); weight (N,) per row or None."""
    loss = -(target * F.log_softmax(logits, -1)).sum(-1)
    if weight is None:
        return loss.mean()
    return (loss * weight).sum() / weight.sum()


# ---------------------------------------------------------------- the model


@register("summer")
class Summer(nn.Module):
    Config = SummerConfig

    def __init__(self, config: SummerConfig, spec: ModelSpec):
        super().__init__()
        c = self.config = config
        self.spec = spec
        unknown = set(spec.input_dims) - set(MODALITIES)
        if unknown or not spec.input_dims:
            raise ValueError(f"SUMMER takes a non-empty subset of {MODALITIES}; got {sorted(spec.input_dims)}")
        if c.latent_loss not in LATENT_LOSSES:
            raise ValueError(f"latent_loss must be one of {sorted(LATENT_LOSSES)}, got {c.latent_loss!r}")
        self.modalities = [m for m in MODALITIES if m in spec.input_dims]
        self.pairs = list(itertools.combinations(self.modalities, 2))
        self.fusion_tokens = self.modalities + [f"{a}+{b}" for a, b in self.pairs]

        self.inputs = nn.ModuleDict({m: nn.Linear(spec.input_dims[m], c.hidden) for m in self.modalities})
        self.speaker = nn.Embedding(c.max_speakers, c.hidden)
        self.input_dropout = nn.Dropout(c.dropout)
        self.sdmoe = nn.ModuleDict({m: nn.ModuleList(SDMoELayer(c) for _ in range(c.sdmoe_layers))
                                    for m in self.modalities})
        self.pair_fusion = nn.ModuleDict({f"{a}+{b}": PairFusion(c) for a, b in self.pairs})
        self.pooling = TokenPooling(c.hidden)
        self.context = AttentionBlock(c.hidden, c.heads, ff_dim=c.ff_dim, dropout=c.dropout, attn_dropout=c.dropout)
        self.head_dropout = nn.Dropout(c.dropout)
        self.classifier = nn.Linear(c.hidden, spec.num_classes)
        self.score_head = nn.Linear(c.hidden, 1) if spec.has_score else None
        weights = torch.tensor(spec.class_weights, dtype=torch.float32) if spec.class_weights else None
        self.register_buffer("class_weights", weights, persistent=False)

        self.teacher, self.to_teacher = None, None
        if c.teacher_checkpoint is not None and "text" in spec.input_dims:
            self.teacher = load_teacher(c.teacher_checkpoint, spec.input_dims["text"], spec.num_classes)
            self.to_teacher = nn.Linear(c.hidden, teacher_width(self.teacher, spec.input_dims["text"]))

    def train(self, mode: bool = True):
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # frozen: no dropout, ever
        return self

    def gates(self, batch: Batch, out: ModelOutput) -> dict[str, Gates]:
        """Each SDMoE router (`router.<modality>.<layer>`, over the utterances that have the modality) and the
        HCMF level-2 pooling over the unimodal and pair states (`hcmf`)."""
        experts = [f"expert{e}" for e in range(self.config.num_experts)]
        found = {f"router.{m}.{layer}": Gates(experts, out.extras[f"router.{m}.{layer}"],
                                              batch.mask & batch.modality_mask[m], self.config.top_k)
                 for m in self.modalities for layer in range(self.config.sdmoe_layers)}
        if len(self.fusion_tokens) > 1:
            found["hcmf"] = Gates(list(self.fusion_tokens), out.extras["hcmf_weights"], batch.mask)
        return found

    def embed(self, batch: Batch, m: str) -> torch.Tensor:
        """(B, T, D_m) features -> (B, T, H): projection (zero where missing) + positions + speaker."""
        x = self.inputs[m](batch.features[m]) * batch.modality_mask[m].unsqueeze(-1).to(batch.features[m].dtype)
        B, T, H = x.shape
        speakers = batch.speakers.clamp(max=self.config.max_speakers - 1)
        x = x + sinusoidal_positions(T, H, device=x.device) + self.speaker(speakers)
        return self.input_dropout(x) * batch.mask.unsqueeze(-1).to(x.dtype)

    def forward(self, batch: Batch) -> ModelOutput:
        c, mask = self.config, batch.mask
        extras, balance = {}, []

        # SDMoE: routed expert bias on each modality's dialogue self-attention
        states = {}
        for m in self.modalities:
            x = self.embed(batch, m)
            for layer, block in enumerate(self.sdmoe[m]):
                x, gates, probs = block(x, mask)
                extras[f"router.{m}.{layer}"] = gates
                balance.append(load_balance(probs, gates, mask))
            states[m] = x  # (B, T, H)

        # HCMF: pairs of modalities, then all unimodal and pair states of an utterance, then the dialogue
        tokens = [states[m] for m in self.modalities]
        tokens += [self.pair_fusion[f"{a}+{b}"](states[a], states[b], mask) for a, b in self.pairs]
        fused, extras["hcmf_weights"] = self.pooling(torch.stack(tokens, dim=2))  # (B, T, H), (B, T, K)
        s = self.context(fused, fused, mask)  # student state (B, T, H)
        extras["hidden"] = s

        out = ModelOutput(logits=self.classifier(self.head_dropout(s)), extras=extras)
        if self.score_head is not None:
            out.score = self.score_head(s).squeeze(-1)

        labelled = batch.labels != IGNORE
        if labelled.any():
            out.losses["ce"] = cross_entropy(out.logits, batch.labels, self.class_weights)
        out.losses["balance"] = c.balance_weight * torch.stack(balance).mean()
        l1 = score_l1(out.score, batch.score, mask)
        if l1 is not None:
            out.losses["score_l1"] = c.score_weight * l1

        # IKD: the frozen text-only teacher guides the student in latent and logit space
        if self.teacher is not None:
            with torch.no_grad():
                taught = self.teacher(text_only(batch))
            t_hidden, t_logits = taught.extras["hidden"], taught.logits
            extras["teacher_logits"] = t_logits
            seen = mask & batch.modality_mask["text"]  # utterances whose text the teacher saw
            if seen.any():
                latent = LATENT_LOSSES[c.latent_loss](self.to_teacher(s[seen]), t_hidden[seen])
                out.losses["kd_cross"] = c.kappa_cross * latent.mean()
                out.losses["align"] = c.kappa_align * kl_distill(out.logits, t_logits, seen, temperature=c.temperature,
                                                                 t_squared=c.t_squared)
            smooth = seen & labelled
            if smooth.any():
                y = batch.labels[smooth]
                soft = F.softmax(t_logits[smooth] / c.temperature, -1)
                target = (1 - c.smooth_mix) * F.one_hot(y, soft.shape[-1]).to(soft.dtype) + c.smooth_mix * soft
                weight = self.class_weights[y] if self.class_weights is not None else None
                out.losses["smooth"] = c.kappa_smooth * soft_cross_entropy(out.logits[smooth], target, weight)
        return out

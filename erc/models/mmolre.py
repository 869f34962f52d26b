"""MMoLRE: Multimodal Mixture of Low-Rank Experts (Shuo Zhang et al., ICME 2025, arXiv 2505.14143).

Multi-task learning of sentiment and emotion with a mixture of experts per modality: shared experts
model what the tasks have in common, one task-specific expert per task what is unique to it, and a
router per task picks the top-k experts for each utterance. Experts are low-rank, so adding experts
costs little. No code is published: everything below is built from the paper's description.

Data flow, per dialogue (B dialogues, T utterances, M modalities, d model width):
features (B, T, D_m) -> projection to d -> UniTSE block x2 (per modality, one stream per task)
-> task-adaptive fusion over modalities (one vector per utterance and task) -> one head per task.

Follows the paper
- Modalities text and audio (the paper: RoBERTa and Data2Vec features, d = 768); `hidden` = 768.
- Low-rank expert: Conv1d kernel 3 (d -> r), non-linearity, Conv1d kernel 1 (r -> d)
  (`LowRankExpert` in erc/models/blocks.py).
- UniTSE (unimodal task-specific feature extraction): 2 stacked blocks. For each modality and each task
  the modality's features are duplicated into one stream per task; in every block a task's stream goes
  through N shared low-rank experts (shared by the tasks, one set per modality and block), the task's own
  low-rank expert, and the task's router, which keeps the top-k experts.
- Task-adaptive multimodal fusion (one per task), then a task-specific output layer per task; the tasks
  are trained jointly.

Follows the official code
- None: no code is published.

Paper and code differ
- Nothing to compare: no code is published.

Departures from the paper, forced by the data here
- The paper's experts convolve over the tokens (or audio frames) of one utterance. erc's features are one
  vector per utterance, so the convolutions run over the utterances of the dialogue: kernel 3 sees the
  previous and next utterance, and two blocks give each utterance a context of +-2 utterances. This is the
  model's only context modelling by default (MMoLRE was built for single utterances).
- `dialogue_context="gru"` (a switch, off by default) adds the smallest dialogue-context layer that keeps the
  paper's design: after each modality's input projection, a bidirectional GRU over the dialogue's utterances,
  added residually (x + GRU(x)), so the experts see a context-aware vector per utterance; everything after it
  is unchanged. It is on the leaderboard as `mmolre_context`, because on validation it beat MMoLRE on
  IEMOCAP by 3.6 points.
- An input projection (Linear -> LayerNorm -> dropout) maps each modality to `hidden`, so any feature
  dim works; with the paper's 768-d features it would be a learned 768 -> 768 map.
- The paper evaluates on MOSI/MOSEI (sentiment score + emotion labels). Here the tasks follow the data:
  MELD (emotion target, sentiment labels beside it: spec.num_sentiment_classes > 0) trains both tasks,
  emotion as `out.logits` and sentiment as `out.sentiment_logits`; MOSI (spec.has_score) trains the
  sentiment task alone, whose head gives the binary classification `out.logits` AND the regression
  `out.score`; IEMOCAP trains the emotion task alone. With one task the router still chooses among the
  N shared experts and that task's own expert.

Choices where neither says
- N = 4 shared experts, rank r = 64, top-k = 2 (of the N + 1 = 5 candidates): N and r are not published;
  top-2 is the usual sparse-MoE choice (GShard, Mixtral); r = 64 = d/12 keeps an expert at ~1/12 of a
  full-rank one (197k vs 2.36M parameters at d = 768) while staying well above LoRA-style ranks of 8-16,
  since here the expert is the whole layer, not an adapter on a frozen one. One rank for all experts
  (the paper's notation r_n allows a different rank per shared expert; its values are not given).
- Router: a Linear(d -> N + 1) on the task's stream, per utterance; softmax over the N + 1 experts, keep the
  top k, renormalise the kept probabilities to sum to 1. No router noise. Every expert is evaluated densely
  on the whole dialogue (a kernel-3 convolution needs the neighbours' inputs anyway; the models here are
  small) and the gate zeroes the unchosen ones, so the result equals sparse dispatch.
- Block update: h <- LayerNorm(h + dropout(sum_e gate_e * expert_e(h))), padded positions zeroed. The
  residual and LayerNorm are not described; they keep two stacked blocks stable at init.
- Block 2 takes each task's block-1 output as that task's input (the streams stay separate; only the shared
  experts, applied to both streams, couple the tasks).
- Non-linearity inside the expert: GELU (the shared `LowRankExpert`).
- Task-adaptive fusion, per task and utterance: attention over the modalities,
  a_m = softmax_m(w_task . tanh(W_task h_m)), fused = sum_m a_m h_m. Modalities missing for an utterance
  (modality_mask False) get no weight; their streams are also treated as padding inside the experts.
- Output layers: dropout then Linear(d -> classes) per task; the score head is a Linear(d -> 1) on the
  sentiment task's fused vector.
- Loss, each a named, already-weighted term: `ce_emotion` (emotion_weight 1.0) and `ce_sentiment`
  (sentiment_weight 1.0): equal task weights, the plain multi-task sum, since the paper gives none;
  `score_l1` (score_weight 1.0, as the baseline) where the data has a score; the main target's CE uses
  spec.class_weights, the auxiliary sentiment CE is unweighted.
- `balance` (balance_weight 0.01): the Switch Transformer load-balancing term (Fedus et al., 2022),
  E * sum_e f_e * P_e with E = N + 1 experts, f_e the share of the top-k slots that expert e receives and
  P_e its mean router probability, over real utterances only, averaged over all routers (blocks, modalities,
  tasks). Its minimum, 1, is reached by uniform routing; 0.01 is the Switch Transformer's weight. It is
  insurance against router collapse, not a fix for one seen here: on MELD (hidden 256, 6 epochs) each of
  the 5 experts took 13-25% of the top-2 slots with the term and without it.
- Dropout 0.3 (after the projection, on the mixed expert output, before the heads): not published. With
  0.1 the model overfit MELD within 3 epochs (hidden 128: best validation weighted F1 51.4, against 53.8
  with 0.3; 0.5 gave 52.4).

Parameter count: `parameter_counts(model)` returns the model's total and its dense equivalent: the same
model with every low-rank expert replaced by a full-rank expert of the same input and output
(Conv1d k=3 d -> d, then Conv1d k=1 d -> d, i.e. rank r = d), and the same N, k, routers, fusion and heads.
This isolates what the low-rank design saves at a given number of experts, which is the paper's claim
(parameter overhead kept low as the number of experts grows).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from erc.data.dialogues import IGNORE, Batch
from erc.models import Gates, ModelOutput, ModelSpec, register
from erc.models.blocks import (Dropout, LowRankExpert, MaskedBiGRU, cross_entropy, load_balance, low_rank_down,
                               low_rank_mix, score_l1, stacked_bigru, top_k_gates)


@dataclass
class MMoLREConfig:
    hidden: int = 768  # model width d (paper: 768, the RoBERTa / Data2Vec feature size)
    num_shared: int = 4  # N shared low-rank experts per modality and block (not published)
    rank: int = 64  # r, the experts' bottleneck (not published)
    top_k: int = 2  # experts kept per utterance by each router, among N + 1 (not published)
    num_blocks: int = 2  # stacked UniTSE blocks (paper: 2)
    dropout: float = 0.3
    emotion_weight: float = 1.0  # weight of ce_emotion
    sentiment_weight: float = 1.0  # weight of ce_sentiment (MELD's second task, or MOSI's only task)
    score_weight: float = 1.0  # weight of score_l1 where the dataset has a continuous score
    balance_weight: float = 0.01  # weight of the load-balancing term; 0 drops it
    dialogue_context: str = "none"  # "gru": a residual BiGRU over the utterances before UniTSE (a departure)




# ---------------------------------------------------------------- UniTSE


class UniTSEBlock(nn.Module):
    """One UniTSE block of one modality: N shared low-rank experts, plus per task its own expert, router
    and LayerNorm. Each task's stream (B, T, d) is updated by its top-k mixture of experts, residually."""

    def __init__(self, dim: int, rank: int, num_shared: int, tasks: list[str], top_k: int, dropout: float):
        super().__init__()
        self.top_k, self.rank = top_k, rank
        self.shared = nn.ModuleList(LowRankExpert(dim, rank) for _ in range(num_shared))
        self.specific = nn.ModuleDict({t: LowRankExpert(dim, rank) for t in tasks})
        self.router = nn.ModuleDict({t: nn.Linear(dim, num_shared + 1) for t in tasks})
        self.norm = nn.ModuleDict({t: nn.LayerNorm(dim) for t in tasks})
        self.dropout = Dropout(dropout)

    def forward(self, streams: dict[str, torch.Tensor], mask: torch.Tensor):
        """streams: {task: (B, T, d)}; mask: (B, T) positions where this modality is real.
        Returns the new streams, the gates {task: (B, T, N+1)} and the balance terms {task: scalar}.

        The experts run batched (`low_rank_down` / `low_rank_mix`): one matmul for the down-projections of all
        the experts that see a stream, one for each task's gated up-projections; the same function as summing
        `gate_e * expert_e(h)` over the experts one by one, up to float summation order."""
        keep = mask.unsqueeze(-1).to(next(iter(streams.values())).dtype)
        shared = list(self.shared)
        down = {}  # block 1 gives every task the same tensor: down-project it once for all of its tasks' experts
        new, gates, balance = {}, {}, {}
        for task, x in streams.items():
            if id(x) not in down:
                group = [t for t, y in streams.items() if y is x]
                down[id(x)] = group, low_rank_down(shared + [self.specific[t] for t in group], x, mask)
            group, h = down[id(x)]  # (B, T, (N + len(group)) * r)
            n, r = len(shared) * self.rank, self.rank
            own = n + group.index(task) * r
            h = torch.cat([h[..., :n], h[..., own:own + r]], dim=-1) if len(group) > 1 else h
            g, probs = top_k_gates(self.router[task](x), self.top_k)  # (B, T, N+1)
            mixed = low_rank_mix(shared + [self.specific[task]], h, g) * keep  # (B, T, d)
            new[task] = self.norm[task](x + self.dropout(mixed)) * keep
            gates[task] = g * keep
            balance[task] = load_balance(probs, g, mask)
        return new, gates, balance


class TaskAdaptiveFusion(nn.Module):
    """One task's fusion of its modality streams: attention over modalities, per utterance.
    a_m = softmax_m(w . tanh(W h_m)) over the modalities present; fused = sum_m a_m h_m."""

    def __init__(self, dim: int):
        super().__init__()
        self.score = nn.Sequential(nn.Linear(dim, dim), nn.Tanh(), nn.Linear(dim, 1, bias=False))

    def forward(self, states: torch.Tensor, present: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """states (B, T, M, d), present (B, T, M) -> fused (B, T, d), weights (B, T, M)."""
        logits = self.score(states).squeeze(-1).masked_fill(~present, float("-inf"))
        logits = logits.masked_fill(~present.any(-1, keepdim=True), 0.0)  # no modality at all: no -inf row
        weights = logits.softmax(-1) * present.to(states.dtype)
        return (weights.unsqueeze(-1) * states).sum(-2), weights


# ---------------------------------------------------------------- model


@register("mmolre")
class MMoLRE(nn.Module):
    Config = MMoLREConfig

    def __init__(self, config: MMoLREConfig, spec: ModelSpec):
        super().__init__()
        if not 1 <= config.top_k <= config.num_shared + 1:
            raise ValueError(f"top_k must be in 1..num_shared+1 = {config.num_shared + 1}, got {config.top_k}")
        self.config, self.spec = config, spec
        self.modalities = sorted(spec.input_dims)
        # The main task is the one in batch.labels: sentiment where the data has a score and no second label
        # set (MOSI), else emotion. Sentiment is a second task where the data has sentiment labels (MELD).
        self.main_task = "sentiment" if spec.has_score and not spec.num_sentiment_classes else "emotion"
        self.tasks = [self.main_task]
        if self.main_task == "emotion" and spec.num_sentiment_classes:
            self.tasks.append("sentiment")
        classes = {self.main_task: spec.num_classes}
        if "sentiment" in self.tasks and self.main_task != "sentiment":
            classes["sentiment"] = spec.num_sentiment_classes
        d = config.hidden
        self.project = nn.ModuleDict({m: nn.Sequential(nn.Linear(spec.input_dims[m], d), nn.LayerNorm(d),
                                                       Dropout(config.dropout)) for m in self.modalities})
        if config.dialogue_context not in ("none", "gru"):
            raise ValueError(f"dialogue_context must be 'none' or 'gru', got {config.dialogue_context!r}")
        self.context = nn.ModuleDict({m: MaskedBiGRU(d, d // 2) for m in self.modalities}) \
            if config.dialogue_context == "gru" else None
        self.unitse = nn.ModuleDict({m: nn.ModuleList(
            UniTSEBlock(d, config.rank, config.num_shared, self.tasks, config.top_k, config.dropout)
            for _ in range(config.num_blocks)) for m in self.modalities})
        self.fusion = nn.ModuleDict({t: TaskAdaptiveFusion(d) for t in self.tasks})
        self.dropout = Dropout(config.dropout)
        self.heads = nn.ModuleDict({t: nn.Linear(d, classes[t]) for t in self.tasks})
        self.score_head = nn.Linear(d, 1) if spec.has_score else None
        weights = torch.tensor(spec.class_weights, dtype=torch.float32) if spec.class_weights else None
        self.register_buffer("class_weights", weights, persistent=False)

    def gates(self, batch: Batch, out: ModelOutput) -> dict[str, Gates]:
        """Each UniTSE router (`router.<modality>.<task>.<block>`, over the utterances that have the modality)
        and each task's fusion over the modalities (`fusion.<task>`, with two or more modalities)."""
        found = {}
        for m in self.modalities:
            for t in self.tasks:
                experts = [f"shared{e}" for e in range(self.config.num_shared)] + [f"{t}-specific"]
                for i in range(self.config.num_blocks):
                    found[f"router.{m}.{t}.{i}"] = Gates(experts, out.extras[f"gates_{m}_{t}_{i}"],
                                                         batch.modality_mask[m] & batch.mask, self.config.top_k)
        if len(self.modalities) > 1:
            some = torch.stack([batch.modality_mask[m] for m in self.modalities]).any(0) & batch.mask
            for t in self.tasks:
                found[f"fusion.{t}"] = Gates(list(self.modalities), out.extras[f"fusion_{t}"], some)
        return found

    def forward(self, batch: Batch) -> ModelOutput:
        extras, balance = {}, []
        per_task = {t: [] for t in self.tasks}  # task -> [(B, T, d) per modality]
        keep = {m: batch.modality_mask[m].unsqueeze(-1).to(batch.features[m].dtype) for m in self.modalities}
        xs = [self.project[m](batch.features[m]) * keep[m] for m in self.modalities]
        if self.context is not None:  # the modalities' GRUs as one recurrence (see stacked_bigru)
            context = stacked_bigru([self.context[m] for m in self.modalities], xs, batch.mask)
            xs = [(x + c) * keep[m] for m, x, c in zip(self.modalities, xs, context)]
        for m, x in zip(self.modalities, xs):
            present = batch.modality_mask[m]  # (B, T): real utterance with this modality
            streams = {t: x for t in self.tasks}  # the features, duplicated per task
            for i, block in enumerate(self.unitse[m]):
                streams, gates, terms = block(streams, present)
                balance.extend(terms.values())
                extras.update({f"gates_{m}_{t}_{i}": g for t, g in gates.items()})
            for t in self.tasks:
                per_task[t].append(streams[t])

        present = torch.stack([batch.modality_mask[m] for m in self.modalities], dim=-1)  # (B, T, M)
        fused = {}
        for t in self.tasks:
            fused[t], extras[f"fusion_{t}"] = self.fusion[t](torch.stack(per_task[t], dim=-2), present)
        logits = {t: self.heads[t](self.dropout(fused[t])) for t in self.tasks}  # {task: (B, T, C_task)}

        extras["hidden"] = fused[self.main_task]
        out = ModelOutput(logits=logits[self.main_task], extras=extras)
        if "sentiment" in self.tasks and self.main_task != "sentiment":
            out.sentiment_logits = logits["sentiment"]
        if self.score_head is not None:
            out.score = self.score_head(self.dropout(fused["sentiment"])).squeeze(-1)

        weight = {"emotion": self.config.emotion_weight, "sentiment": self.config.sentiment_weight}
        targets = {t: batch.labels if t == self.main_task else batch.sentiment for t in self.tasks}
        for t in self.tasks:
            if (targets[t] != IGNORE).any():
                class_weights = self.class_weights if t == self.main_task else None
                out.losses[f"ce_{t}"] = weight[t] * cross_entropy(logits[t], targets[t], class_weights)
        l1 = score_l1(out.score, batch.score, batch.mask)
        if l1 is not None:
            out.losses["score_l1"] = self.config.score_weight * l1
        if self.config.balance_weight and balance:
            out.losses["balance"] = self.config.balance_weight * torch.stack(balance).mean()
        return out


def parameter_counts(model: MMoLRE) -> dict[str, int]:
    """Parameters of `model`, and of its dense equivalent: every low-rank expert (Conv1d k=3 d->r, Conv1d
    k=1 r->d) replaced by a full-rank one of the same input and output (Conv1d k=3 d->d, Conv1d k=1 d->d),
    everything else (N, k, routers, projections, fusion, heads) unchanged.

    Returns total, experts (the low-rank experts' share of total), num_experts, dense_equivalent and
    dense_experts (the full-rank experts' share of dense_equivalent).
    """
    total = sum(p.numel() for p in model.parameters())
    experts = [m for m in model.modules() if isinstance(m, LowRankExpert)]
    low_rank = sum(p.numel() for e in experts for p in e.parameters())
    d = model.config.hidden
    full_rank = len(experts) * ((3 * d * d + d) + (d * d + d))  # weights + biases of the two convolutions
    return {"total": total, "experts": low_rank, "num_experts": len(experts),
            "dense_equivalent": total - low_rank + full_rank, "dense_experts": full_rank}

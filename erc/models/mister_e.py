"""MiSTER-E: a mixture of speech, text and cross-modal experts over the conversation.

Dutta, Balaji and Ganapathy, arXiv 2602.23300 (2026); official code iiscleap/MiSTER-E @bb4bff9
(`hierarchical_moe.py`, `train_moe.py`). Stage 2 only: the paper's stage 1 (LoRA-tuned LLM utterance
encoders) is replaced by whatever features erc feeds; speech is erc's "audio" modality.
Reported weighted F1 (abstract; epochs selected on the test split, see below): IEMOCAP-6 70.9, MELD 69.5,
MOSI 87.9.

Forward pass, per dialogue (B dialogues, T utterances):
- speech expert and text expert, one per modality: parallel Conv1d over the utterance axis, kernels 1, 3 and 5
  (input dim -> width, ReLU each, summed) -> 3-layer bidirectional GRU (width/2 per direction) -> + Linear skip
  from the input -> Linear head to the classes;
- cross-modal expert: Linear per modality (input dim -> width); 4 blocks, each cross-attention (speech queries
  text, text queries speech, both from the block's inputs) then self-attention per modality, in 120-d with
  3 heads, out-projection back to width, dropout, residual and LayerNorm; + a residual Linear per modality
  from the input; concatenation -> LayerNorm -> Linear(2 width -> width) -> ReLU -> Linear head;
- gate: an MLP on the concatenated expert logits (3C -> 10 -> ReLU -> 3), softmax(./T) with T = 2, per
  utterance; the output is the gate-weighted sum of the expert logits (`extras["gate"]`, columns in the
  order of `model.expert_names`: speech, text, cross).

Loss: focal (gamma 3) on the mixed logits ("focal_mix") + focal on each expert ("focal_speech", "focal_text",
"focal_cross") + 2 x supervised contrastive loss between the cross-modal expert's speech and text
representations ("supcon") + 0.1 x symmetric KL averaged over the expert pairs ("kl").

Follows the paper
- No speaker input anywhere; the experts see the dialogue only through the convolutions, GRUs and attention.
- Three experts (speech, text, cross-modal) mixed per utterance by a gate over their logits.
- Loss weights: 1 for the mixed focal loss and for each expert's focal loss, 2 for the contrastive loss,
  0.1 for the expert-agreement KL.

Follows the official code
- Expert layout as above: widths 2048 -> 1024, GRU hidden 512 x 3 layers, skip Linear added after the GRU
  (no activation); cross-modal projections to 120-d with 3 heads, attention dropout 0.1, dropout 0.5 after
  each out-projection; the residual Linear per modality from the raw input; LayerNorm -> Linear -> ReLU ->
  Linear head of the cross-modal expert.
- The contrastive views are the cross-modal expert's speech and text states after the residual Linear
  (before the concatenation), both views of all utterances in one SupCon (positives: same label, any view,
  not itself), temperature 1.
- Gate: Linear(3C -> 10) -> ReLU -> Linear(10 -> 3), softmax(logits / 2); gradients flow through the
  gate into the experts (the expert logits are not detached); gamma 3 for all four focal terms; KL
  temperature 1.
- No dropout in the speech and text experts: the code declares 0.2 but never applies it
  (`expert_dropout`, default 0.0, adds it between GRU layers if wanted).

Paper and code differ
- The paper describes the stage-1 text encoder as Qwen2.5-7B, the released code extracts with Llama-3.1-8B;
  irrelevant here (erc's own features).
- The released code selects the epoch on the TEST split; erc selects on validation only.

Choices where neither says
- Optimisation is erc's pipeline's (params.yaml), not the paper's Adam lr 1e-5, 8 dialogues, 100 epochs,
  clip 1.0: those suit 2048-d LLM features on a GPU, not the small CPU runs here.
- Attention uses the shared `AttentionBlock`'s maths and initialisation (run in pairs, parameters held stacked:
  `StackedAttention`): one Linear each for q, k, v (width -> 120) and one back (120 -> width), LayerNorm eps
  1e-5. The code chains Linear(1024 -> 120) into nn.MultiheadAttention's own 120 -> 120 in- and
  out-projections, then Linear(120 -> 1024), LayerNorm eps 1e-6: the same functions (a product of linear maps
  is linear), with fewer parameters here.
- Padding is masked everywhere (the released code has no mask at all): masked convolutions, packed GRUs,
  key-padding masks in every attention, SupCon and KL over real utterances only. Hence two scale
  differences from the code: the focal losses are means over labelled utterances (the code averages over
  all positions, padding included, so its loss shrinks with padding), and the KL is the shared
  `symmetric_kl` (over all the expert pairs at once: `mean_symmetric_kl`), (KL(p||q) + KL(q||p)) / 2 per real
  utterance (the code sums the two KLs without the 1/2 and, through `batchmean` on a (B, T, C) tensor, sums
  over utterances and divides by dialogues only).
- Any input dim: the first convolutions and the Linear projections take the feature dim given by the data;
  the model's `width` (1024 in the paper) is a config field, the GRU hidden is width / 2 per direction.
- Modalities: the paper uses speech and text only; "video", if given, is ignored. With text and audio all
  three experts run. With one of them only its expert runs: no cross-modal expert, no gate (its weight is
  1: `extras["gate"]` is all ones, shape (B, T, 1)), no contrastive or KL term, and no separate expert focal
  term (it would equal "focal_mix" and only double it).
- An utterance whose modality is missing (`modality_mask` False) gets zero features for it; the experts
  still give it a state from the dialogue context, and its missing view is left out of the SupCon loss.
  The gate gives no weight to an expert whose input the utterance lacks (the speech expert without audio,
  the text expert without text, the cross-modal expert without either) and renormalises over the others, so
  the prediction comes from experts that saw the utterance (one lacking both modalities keeps all experts).
- Class weights (when given) weight every focal term; SupCon and KL are unweighted.
- Continuous sentiment (MOSI): each expert has a Linear score head on its final state, and the score is
  the gate-weighted sum of the expert scores, trained with L1 like the baseline.
- A second classification task (MELD sentiment) is not used, like the baseline.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from erc.data.dialogues import IGNORE, Batch
from erc.models import Gates, ModelOutput, ModelSpec, register
from erc.models.blocks import (AttentionBlock, MaskedBiGRU, MaskedConv1d, StackedAttention, focal_loss, focal_losses,
                               mean_symmetric_kl, score_l1, stacked_bigru, stacked_conv1d, supervised_contrastive)

SPEECH, TEXT = "audio", "text"  # erc's modality names for the paper's speech and text
EXPERT_OF = {SPEECH: "speech", TEXT: "text"}


@dataclass
class MisterEConfig:
    width: int = 1024  # expert width (official: inputs 2048 -> 1024); GRU hidden is width / 2 per direction
    kernel_sizes: tuple = (1, 3, 5)  # parallel Conv1d branches of the speech and text experts
    gru_layers: int = 3
    expert_dropout: float = 0.0  # between GRU layers (official code: declared, never applied)
    cross_blocks: int = 4  # cross- then self-attention blocks in the cross-modal expert
    attn_dim: int = 120  # attention runs in this space...
    heads: int = 3  # ...with this many heads
    dropout: float = 0.5  # after each attention out-projection
    attn_dropout: float = 0.1
    gate_hidden: int = 10
    gate_temperature: float = 2.0
    focal_gamma: float = 3.0
    supcon_weight: float = 2.0
    supcon_temperature: float = 1.0
    kl_weight: float = 0.1
    kl_temperature: float = 1.0
    score_weight: float = 1.0  # weight of the L1 regression loss where the dataset has a score


class ContextExpert(nn.Module):
    """Speech or text expert: parallel Conv1d (k = 1, 3, 5) -> BiGRU -> + skip -> head.

    (B, T, D) features -> state (B, T, width) and logits (B, T, C).
    """

    def __init__(self, dim: int, config: MisterEConfig, num_classes: int):
        super().__init__()
        width = config.width
        self.convs = nn.ModuleList(MaskedConv1d(dim, width, kernel_size=k, padding=k // 2) for k in config.kernel_sizes)
        self.gru = MaskedBiGRU(width, width // 2, num_layers=config.gru_layers, dropout=config.expert_dropout)
        self.skip = nn.Linear(dim, width)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.finish(x, self.gru(self.local(x, mask), mask), mask)

    def local(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The convolutions' part: (B, T, D) -> (B, T, width), the GRU's input."""
        branches = F.relu(stacked_conv1d(list(self.convs), x, mask))  # the branches as one matmul
        return branches.unflatten(-1, (len(self.convs), -1)).sum(-2)

    def finish(self, x: torch.Tensor, recurrent: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The skip and the head, after the GRU's output `recurrent`."""
        state = (recurrent + self.skip(x)) * mask.unsqueeze(-1).to(x.dtype)
        return state, self.head(state)


class CrossModalExpert(nn.Module):
    """Speech (B, T, D_s) and text (B, T, D_t) -> their contrastive views (B, T, width) each, the fused
    state (B, T, width) and logits (B, T, C).

    Each block is two steps, each a pair of attentions run as one (speech's, text's): cross-attention (speech
    queries text, text queries speech, both from the block's input), then self-attention per modality. All the
    blocks' attentions are created as AttentionBlocks in that order (block by block: speech from text, text from
    speech, speech's self, text's self) and held stacked in `attention`, one call per step: (2 x blocks, 2, ...)."""

    def __init__(self, speech_dim: int, text_dim: int, config: MisterEConfig, num_classes: int):
        super().__init__()
        width = config.width
        self.speech_in, self.text_in = nn.Linear(speech_dim, width), nn.Linear(text_dim, width)

        def attention():
            return AttentionBlock(width, config.heads, attn_dim=config.attn_dim, dropout=config.dropout,
                                  attn_dropout=config.attn_dropout)

        self.attention = StackedAttention([[attention(), attention()] for _ in range(2 * config.cross_blocks)])
        self.speech_skip, self.text_skip = nn.Linear(speech_dim, width), nn.Linear(text_dim, width)
        self.norm = nn.LayerNorm(2 * width)
        self.fuse = nn.Linear(2 * width, width)
        self.head = nn.Linear(width, num_classes)

    def forward(self, speech_x: torch.Tensor, text_x: torch.Tensor, mask: torch.Tensor):
        m = mask.unsqueeze(-1).to(speech_x.dtype)
        x = torch.stack([self.speech_in(speech_x), self.text_in(text_x)])  # (2, B, T, width)
        steps = iter(self.attention.weights())
        for cross, own in zip(steps, steps):  # the blocks
            x = self.attention(cross, x, x.flip(0), mask)  # speech queries text, text queries speech
            x = self.attention(own, x, None, mask)
        speech, text = x.unbind(0)  # padded rows: masked just below
        speech = (speech + self.speech_skip(speech_x)) * m  # the contrastive views
        text = (text + self.text_skip(text_x)) * m
        state = F.relu(self.fuse(self.norm(torch.cat([text, speech], dim=-1))))  # (B, T, width)
        return speech, text, state, self.head(state)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A checkpoint saved before the attentions were held stacked names each block's Linear and LayerNorm
        # (`blocks.<i>.<speech_from_text|text_from_speech|speech_self|text_self>.<q|k|v|out|norm>.*`): the same
        # values, stacked here as StackedAttention holds them, so that erc's earlier MiSTER-E checkpoints load.
        old = f"{prefix}blocks."
        if any(key.startswith(old) for key in state_dict):
            def tensor(block, name, layer, kind):
                return state_dict.pop(f"{old}{block}.{name}.{layer}.{kind}")

            calls = [(block, pair) for block in range(self.attention.calls // 2)
                     for pair in (("speech_from_text", "text_from_speech"), ("speech_self", "text_self"))]

            def stacked(layer, kind):  # (calls, 2, ...), as StackedAttention holds it
                def one(block, name):
                    if layer == "qkv":
                        return torch.cat([tensor(block, name, x, kind) for x in "qkv"])
                    return tensor(block, name, layer, kind)

                values = torch.stack([torch.stack([one(block, name) for name in pair]) for block, pair in calls])
                return values if kind == "weight" and layer != "norm" else values.unsqueeze(2)

            for layer in ("qkv", "out", "norm"):
                for kind in ("weight", "bias"):
                    state_dict[f"{prefix}attention.{layer}_{kind}"] = stacked(layer, kind)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class Gate(nn.Module):
    """Per-utterance weights over E experts from their concatenated logits: softmax(MLP(z) / T)."""

    def __init__(self, num_experts: int, num_classes: int, hidden: int, temperature: float):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(num_experts * num_classes, hidden), nn.ReLU(),
                                 nn.Linear(hidden, num_experts))
        self.temperature = temperature

    def forward(self, expert_logits: torch.Tensor, available: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T, E, C) -> (B, T, E); `available` (B, T, E) bool: experts that may get weight (None: all)."""
        scores = self.mlp(expert_logits.flatten(-2)) / self.temperature
        if available is not None:
            scores = scores.masked_fill(~available, float("-inf"))
        return scores.softmax(-1)


@register("mister_e")
class MisterE(nn.Module):
    Config = MisterEConfig

    def __init__(self, config: MisterEConfig, spec: ModelSpec):
        super().__init__()
        if config.width % 2:
            raise ValueError(f"mister_e: width must be even (a bidirectional GRU of width/2), got {config.width}")
        self.config, self.spec = config, spec
        self.modalities = [m for m in (SPEECH, TEXT) if m in spec.input_dims]
        if not self.modalities:
            raise ValueError(f"mister_e needs 'audio' (speech) and/or 'text'; got {sorted(spec.input_dims)}")
        C = spec.num_classes
        self.experts = nn.ModuleDict({EXPERT_OF[m]: ContextExpert(spec.input_dims[m], config, C)
                                      for m in self.modalities})
        self.cross = None
        if len(self.modalities) == 2:
            self.cross = CrossModalExpert(spec.input_dims[SPEECH], spec.input_dims[TEXT], config, C)
        self.expert_names = [EXPERT_OF[m] for m in self.modalities] + (["cross"] if self.cross else [])
        E = len(self.expert_names)
        self.gate = Gate(E, C, config.gate_hidden, config.gate_temperature) if E > 1 else None
        self.score_heads = (nn.ModuleDict({name: nn.Linear(config.width, 1) for name in self.expert_names})
                            if spec.has_score else None)
        weights = torch.tensor(spec.class_weights, dtype=torch.float32) if spec.class_weights else None
        self.register_buffer("class_weights", weights, persistent=False)

    def available(self, batch: Batch) -> torch.Tensor:
        """(B, T, E) bool: the experts whose input each utterance has; all of them where it has none."""
        has = {EXPERT_OF[m]: batch.modality_mask[m] for m in self.modalities}
        if self.cross is not None:
            has["cross"] = has["speech"] & has["text"]
        available = torch.stack([has[n] for n in self.expert_names], dim=-1)
        return available | ~available.any(-1, keepdim=True)

    def gates(self, batch: Batch, out: ModelOutput) -> dict[str, Gates]:
        """The gate over the experts (speech, text, cross), per utterance; none with a single expert."""
        if self.gate is None:
            return {}
        return {"gate": Gates(list(self.expert_names), out.extras["gate"], batch.mask)}

    def forward(self, batch: Batch) -> ModelOutput:
        cfg, mask = self.config, batch.mask
        # A missing modality of an utterance is zero input (padding is zero already).
        x = {m: batch.features[m] * batch.modality_mask[m].unsqueeze(-1).to(batch.features[m].dtype)
             for m in self.modalities}

        states, logits = {}, {}
        experts = [self.experts[EXPERT_OF[m]] for m in self.modalities]
        # The speech and text experts' GRUs run as one recurrence (their maths unchanged, see stacked_bigru)
        local = [e.local(x[m], mask) for e, m in zip(experts, self.modalities)]
        recurrent = stacked_bigru([e.gru for e in experts], local, mask)
        for m, expert, r in zip(self.modalities, experts, recurrent):
            states[EXPERT_OF[m]], logits[EXPERT_OF[m]] = expert.finish(x[m], r, mask)
        if self.cross is not None:
            speech_view, text_view, states["cross"], logits["cross"] = self.cross(x[SPEECH], x[TEXT], mask)

        stacked = torch.stack([logits[n] for n in self.expert_names], dim=-2)  # (B, T, E, C)
        if self.gate is not None:
            gate = self.gate(stacked, self.available(batch))  # (B, T, E)
        else:
            gate = stacked.new_ones(stacked.shape[:-1])
        mixed = (gate.unsqueeze(-1) * stacked).sum(-2)  # (B, T, C)
        out = ModelOutput(logits=mixed, extras={"gate": gate, "expert_logits": stacked})
        if self.score_heads is not None:
            scores = torch.stack([self.score_heads[n](states[n]).squeeze(-1) for n in self.expert_names], -1)
            out.score = (gate * scores).sum(-1)  # (B, T)

        if (batch.labels != IGNORE).any():
            if len(self.expert_names) > 1:  # the mixed and every expert's focal loss, as one
                focal = focal_losses(torch.cat([mixed.unsqueeze(-2), stacked], dim=-2), batch.labels, cfg.focal_gamma,
                                     self.class_weights)
                for name, value in zip(["mix", *self.expert_names], focal.unbind()):
                    out.losses[f"focal_{name}"] = value
            else:
                out.losses["focal_mix"] = focal_loss(mixed, batch.labels, cfg.focal_gamma, self.class_weights)
            if self.cross is not None and cfg.supcon_weight:
                # Both views of every labelled utterance in one SupCon; a view whose modality is missing is out.
                views = torch.cat([speech_view.flatten(0, 1), text_view.flatten(0, 1)])
                view_labels = torch.cat([batch.labels.masked_fill(~batch.modality_mask[SPEECH], IGNORE).flatten(),
                                         batch.labels.masked_fill(~batch.modality_mask[TEXT], IGNORE).flatten()])
                out.losses["supcon"] = cfg.supcon_weight * supervised_contrastive(views, view_labels,
                                                                                  cfg.supcon_temperature)
        if len(self.expert_names) > 1 and cfg.kl_weight:
            out.losses["kl"] = cfg.kl_weight * mean_symmetric_kl(stacked, mask, cfg.kl_temperature)  # over expert pairs
        l1 = score_l1(out.score, batch.score, mask)
        if l1 is not None:
            out.losses["score_l1"] = cfg.score_weight * l1
        return out

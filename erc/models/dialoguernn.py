"""DialogueRNN: an attentive RNN that keeps a state per party of the conversation (Majumder et al., AAAI 2019).

arXiv 1811.00405; official code declare-lab/conv-emotion @6128ca2 (`DialogueRNN/model.py`, `train_IEMOCAP.py`,
`train_MELD.py`). The variant here is BiDialogueRNN+Att, the one the official code's defaults are meant for (its
README) and the row most tables print.

Reported weighted F1 (on the papers' own features, never erc's):
- IEMOCAP-6: 62.75, BiDialogueRNN+Att in the paper; the official IEMOCAP script feeds the text
  features alone (`model(textf, qmask, umask)`). The paper has no MELD results.
- conv-emotion's README (@6128ca2) lists "RoBERTa DialogueRNN" (DialogueRNN on RoBERTa utterance features, a
  baseline of the COSMIC paper): IEMOCAP 64.76, MELD 63.61 (7 emotions; 72.14 on its 3 sentiments), EmoryNLP 37.44.
- The released DialogueRNN scripts pick the epoch on the TEST split (IEMOCAP: lowest test loss; MELD: highest test
  F1; no validation split), so the paper's figures are test-selected; the README does not say how its rows were
  selected. erc selects on validation.

Follows the paper (t = 1..T over the utterances u_t of a dialogue, s = the speaker of u_t)
- Global GRU: g_t = GRU_G(g_{t-1}, u_t ⊕ q_{s,t-1}), the context of the conversation with the speaker's state.
- Attention over the global history: α = softmax(u_t^T W_α [g_1, ..., g_{t-1}]), c_t = α [g_1, ..., g_{t-1}]^T
  (c_1 = 0: no history yet).
- Party GRU, the speaker's state only: q_{s,t} = GRU_P(q_{s,t-1}, u_t ⊕ c_t). Listeners keep their state
  (the paper's DialogueRNN) or, with `listener_state=True` (the paper's DialogueRNN_l, "active listener"), are
  updated by q_{l,t} = GRU_L(q_{l,t-1}, u_t ⊕ q_{s,t}). Default off: the paper's main rows and the official
  default (`--active-listener` off in `train_IEMOCAP.py` and `train_MELD.py`).
- Emotion GRU: e_t = GRU_E(e_{t-1}, q_{s,t}); every state starts at zero.
- Bidirectional (BiDialogueRNN): a second DialogueRNN with its own weights runs over the dialogue reversed; the
  emotion states of the two directions are concatenated.
- Emotion attention (+Att): β_t = softmax(e_t^T W_β [e_1, ..., e_T]), ẽ_t = β_t [e_1, ..., e_T]^T over the whole
  dialogue (past and future), then a ReLU layer and a softmax classifier.
- Multimodal: the paper's multimodal runs concatenate the modalities' features into one utterance vector u_t
  (the official MELD script: `torch.cat((textf, acouf), dim=-1)`); so does erc, modalities in sorted order.

Follows the official code
- Attention scores of the global history in the "general" form (the official `--attention general` default):
  (W_α u_t)·g_j with W_α a bias-free Linear(D_m -> D_g). Emotion attention in its "general2" form:
  (W_β e_t + b)·e_j with a bias, masked softmax over the dialogue's real utterances.
- Dropout: `rec_dropout` on the new global, party (speaker and listener) and emotion states inside the recurrence
  (so a dropped state is also what the next step reads), `emotion_dropout` on the concatenated emotion states
  (the official dropout + 0.15), `dropout` after the ReLU layer.
- Head: Linear(K·D_e -> K·D_h) -> ReLU -> Dropout -> Linear(K·D_h -> C), K = 2 directions (1 without).
- Defaults are the official IEMOCAP sizes (D_g = D_p = 500, D_e = D_h = 300, dropouts 0.1 / 0.1 / 0.25); the
  official MELD script uses D_g = D_p = 150, D_e = D_h = 100. Official training (not part of this file): Adam,
  IEMOCAP lr 1e-4, weight decay 1e-5, 30 dialogues a batch, 60 epochs, class weights 1/frequency; MELD lr 5e-4,
  100 epochs, unweighted.
- Loss: CE over the labelled utterances, class-weighted as the weighted mean Σ w_y·nll / Σ w_y (the official
  MaskedNLLLoss), with erc's per-dataset class weights (spec.class_weights).

Departs from the official code
- Speed: the cells of both directions and all dialogues of the batch run as one batched step (the input-side
  products of every step are one matmul before the loop), and the speaker's party GRU runs for the speaker alone
  (the official cell runs it for every party, then keeps the speaker's row: the same result).
- Padding: the reverse direction runs each dialogue reversed within its own length, so padded utterances only
  ever follow the real ones; the emotion attention masks padded keys. A real utterance's outputs do not depend on
  the padding or on the other dialogues of the batch. (The official code runs the same way, but its fixed party
  count comes from the data loader; here it is the batch's.)

Choices where neither says
- Parties: erc's per-dialogue speaker index (`batch.speakers`, by first appearance or by name,
  `train.speakers`); the batch has one party state per index up to its largest, so any number of speakers runs.
  A party that never speaks in a dialogue is never read.
- A missing modality (modality_mask False) enters u_t as zeros.
- MOSI score: Linear(K·D_h -> 1) on the ReLU layer's output, L1 loss weighted by `score_weight` (as the baseline).
  MELD's sentiment labels are not used (single-task, as the baseline). No gates; `extras["emotions"]` holds the
  emotion states (B, T, K·D_e) before the attention, `extras["emotion_attention"]` β (B, T, T).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from erc.data.dialogues import IGNORE, Batch
from erc.models import ModelOutput, ModelSpec, register
from erc.models.blocks import cross_entropy, score_l1


@dataclass
class DialogueRNNConfig:
    global_size: int = 500  # D_g, global GRU state
    party_size: int = 500  # D_p, party GRU state
    emotion_size: int = 300  # D_e, emotion GRU state per direction
    hidden: int = 300  # D_h, the ReLU layer per direction
    bidirectional: bool = True  # BiDialogueRNN
    emotion_attention: bool = True  # +Att
    listener_state: bool = False  # DialogueRNN_l: listeners' states updated too
    dropout: float = 0.1  # after the ReLU layer
    rec_dropout: float = 0.1  # on the new states inside the recurrence
    emotion_dropout: float = 0.25  # on the emotion states (official: dropout + 0.15)
    score_weight: float = 1.0  # weight of the L1 regression loss where the dataset has a score


class DialogueRNNCells(nn.Module):
    """One direction's cells: global, party (speaker), optional listener and emotion GRUs, and W_α."""

    def __init__(self, dim: int, config: DialogueRNNConfig):
        super().__init__()
        D_g, D_p, D_e = config.global_size, config.party_size, config.emotion_size
        self.global_gru = nn.GRUCell(dim + D_p, D_g)  # input u_t ⊕ q_{s,t-1}
        self.party_gru = nn.GRUCell(dim + D_g, D_p)  # input u_t ⊕ c_t
        self.listener_gru = nn.GRUCell(dim + D_p, D_p) if config.listener_state else None  # input u_t ⊕ q_{s,t}
        self.emotion_gru = nn.GRUCell(D_p, D_e)  # input q_{s,t}
        self.attention = nn.Linear(dim, D_g, bias=False)  # W_α


def gru_step(gi: torch.Tensor, gh: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """PyTorch's GRU cell from its input and hidden projections (gates r, z, n): h' = (1 - z) n + z h."""
    H = h.shape[-1]
    r, z = torch.sigmoid(gi[..., :2 * H] + gh[..., :2 * H]).chunk(2, dim=-1)
    n = torch.tanh(gi[..., 2 * H:] + r * gh[..., 2 * H:])
    return n + z * (h - n)


def recurrence(directions: list[DialogueRNNCells], u: torch.Tensor, speakers: torch.Tensor, parties: int,
               rec_dropout: float, training: bool) -> torch.Tensor:
    """K directions' DialogueRNNs, each on its own utterances u (K, B, T, D) and speakers (K, B, T), as one
    batched recurrence. Returns the emotion states (K, B, T, D_e).

    Every cell's weights are stacked over the directions, so a step is a handful of batched matmuls for all of
    them; the products with u_t (global and party GRU inputs, the attention query, the listener input) are
    computed for all steps before the loop."""
    K, B, T, D = u.shape
    first = directions[0]
    D_g, D_p, D_e = first.global_gru.hidden_size, first.party_gru.hidden_size, first.emotion_gru.hidden_size
    listener = first.listener_gru is not None

    def stacked(cell: str, name: str) -> torch.Tensor:  # (K, ...) one weight of one cell over the directions
        return torch.stack([getattr(getattr(d, cell), name) for d in directions])

    def input_side(cell: str) -> tuple[torch.Tensor, torch.Tensor]:
        """u_t's part of a cell's input projection for every step (K, B, T, 3H), and the weight of the rest of
        the input, transposed (K, D_rest, 3H)."""
        w = stacked(cell, "weight_ih")  # (K, 3H, D + D_rest)
        from_u = torch.matmul(u, w[:, :, :D].transpose(1, 2).unsqueeze(1)) + stacked(cell, "bias_ih")[:, None, None]
        return from_u, w[:, :, D:].transpose(1, 2)

    def hidden_side(cell: str) -> tuple[torch.Tensor, torch.Tensor]:  # (K, H, 3H), (K, 1, 3H)
        return stacked(cell, "weight_hh").transpose(1, 2), stacked(cell, "bias_hh").unsqueeze(1)

    def drop(x: torch.Tensor) -> torch.Tensor:
        return F.dropout(x, rec_dropout, training) if rec_dropout else x

    g_u, g_w = input_side("global_gru")  # g_w: q_{s,t-1}'s part
    g_hh, g_bh = hidden_side("global_gru")
    p_u, p_w = input_side("party_gru")  # p_w: c_t's part
    p_hh, p_bh = hidden_side("party_gru")
    e_ih, e_bi = stacked("emotion_gru", "weight_ih").transpose(1, 2), stacked("emotion_gru", "bias_ih").unsqueeze(1)
    e_hh, e_bh = hidden_side("emotion_gru")
    query = torch.matmul(u, stacked("attention", "weight").transpose(1, 2).unsqueeze(1))  # (K, B, T, D_g): W_α u_t
    if listener:
        l_u, l_w = input_side("listener_gru")  # l_w: q_{s,t}'s part
        l_hh, l_bh = hidden_side("listener_gru")
        l_u = l_u.unbind(2)
    who = speakers[..., None, None].expand(K, B, T, 1, D_p)  # gather/scatter index of the speaker's party state

    g, e = u.new_zeros(K, B, D_g), u.new_zeros(K, B, D_e)
    q = u.new_zeros(K, B, parties, D_p)  # every party's state
    history, emotions = [], []
    for t, (g_u_t, p_u_t, query_t, who_t) in enumerate(zip(g_u.unbind(2), p_u.unbind(2), query.unbind(2),
                                                         who.unbind(2))):
        speaker = q.gather(2, who_t).squeeze(2)  # (K, B, D_p): q_{s,t-1}
        g = drop(gru_step(torch.baddbmm(g_u_t, speaker, g_w), torch.baddbmm(g_bh, g, g_hh), g))
        if history:  # c_t: attention of W_α u_t over g_1 .. g_{t-1}
            past = torch.stack(history, dim=2)  # (K, B, t, D_g)
            alpha = torch.matmul(past, query_t.unsqueeze(-1)).softmax(dim=2)  # (K, B, t, 1)
            context = (alpha * past).sum(2)
        else:
            context = g.new_zeros(K, B, D_g)
        history.append(g)
        speaker = drop(gru_step(torch.baddbmm(p_u_t, context, p_w), torch.baddbmm(p_bh, speaker, p_hh), speaker))
        if listener:  # every party's state as a listener's, then the speaker's row replaced by its own update
            heard = torch.baddbmm(l_u[t], speaker, l_w).unsqueeze(2)  # (K, B, 1, 3 D_p)
            q = drop(gru_step(heard, torch.matmul(q, l_hh.unsqueeze(1)) + l_bh.unsqueeze(1), q))
        q = q.scatter(2, who_t, speaker.unsqueeze(2))
        e = drop(gru_step(torch.baddbmm(e_bi, speaker, e_ih), torch.baddbmm(e_bh, e, e_hh), e))
        emotions.append(e)
    return torch.stack(emotions, dim=2)


def reversal(mask: torch.Tensor) -> torch.Tensor:
    """(B, T) index that reverses each dialogue within its own length (padding stays in place); its own inverse."""
    lengths = mask.sum(1, keepdim=True).clamp(min=1)
    steps = torch.arange(mask.shape[1], device=mask.device)
    return torch.where(steps < lengths, lengths - 1 - steps, steps)


def reorder(x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """x (B, T, ...) with its time axis permuted per dialogue by order (B, T)."""
    return x.gather(1, order.view(*order.shape, *[1] * (x.dim() - 2)).expand(x.shape))


@register("dialoguernn")
class DialogueRNN(nn.Module):
    """Batch -> logits (B, T, C) from the (bi)directional DialogueRNN's emotion states, attention, ReLU layer."""

    Config = DialogueRNNConfig

    def __init__(self, config: DialogueRNNConfig, spec: ModelSpec):
        super().__init__()
        self.config, self.spec = config, spec
        self.modalities = sorted(spec.input_dims)
        dim = sum(spec.input_dims[m] for m in self.modalities)  # D_m: the concatenated utterance vector
        K = 2 if config.bidirectional else 1
        self.directions = nn.ModuleList([DialogueRNNCells(dim, config) for _ in range(K)])
        width = K * config.emotion_size
        self.emotion_dropout = nn.Dropout(config.emotion_dropout)
        self.emotion_attention = nn.Linear(width, width) if config.emotion_attention else None  # W_β, b
        self.linear = nn.Linear(width, K * config.hidden)
        self.dropout = nn.Dropout(config.dropout)
        self.classifier = nn.Linear(K * config.hidden, spec.num_classes)
        self.score_head = nn.Linear(K * config.hidden, 1) if spec.has_score else None
        weights = torch.tensor(spec.class_weights, dtype=torch.float32) if spec.class_weights else None
        self.register_buffer("class_weights", weights, persistent=False)

    def forward(self, batch: Batch) -> ModelOutput:
        cfg, mask = self.config, batch.mask

        # u_t: the modalities concatenated, a missing one as zeros; the reverse direction reads each dialogue
        # backwards within its length.
        u = torch.cat([batch.features[m] * batch.modality_mask[m].unsqueeze(-1) for m in self.modalities], dim=-1)
        speakers = batch.speakers * mask
        order = reversal(mask)
        us, whos = [u, reorder(u, order)], [speakers, reorder(speakers, order)]
        K = len(self.directions)
        emotions = recurrence(list(self.directions), torch.stack(us[:K]), torch.stack(whos[:K]),
                              int(speakers.max()) + 1, cfg.rec_dropout, self.training)  # (K, B, T, D_e)
        if K == 2:  # the reverse direction's states back in time order
            emotions = torch.stack([emotions[0], reorder(emotions[1], order)])
        keep = mask.unsqueeze(-1).to(u.dtype)
        e = torch.cat(emotions.unbind(0), dim=-1) * keep  # (B, T, K D_e)
        extras = {"emotions": e}

        # Emotion attention over the whole dialogue (its real utterances), ReLU layer, heads.
        x = self.emotion_dropout(e)
        if self.emotion_attention is not None:
            scores = torch.matmul(self.emotion_attention(x), x.transpose(1, 2))  # (B, T query, T key)
            extras["emotion_attention"] = scores.masked_fill(~mask.unsqueeze(1), float("-inf")).softmax(dim=-1)
            x = torch.matmul(extras["emotion_attention"], x)
        h = self.dropout(F.relu(self.linear(x))) * keep
        out = ModelOutput(logits=self.classifier(h), extras={**extras, "hidden": h})
        if self.score_head is not None:
            out.score = self.score_head(h).squeeze(-1)

        if (batch.labels != IGNORE).any():
            out.losses["ce"] = cross_entropy(out.logits, batch.labels, self.class_weights)
        l1 = score_l1(out.score, batch.score, mask)
        if l1 is not None:
            out.losses["score_l1"] = cfg.score_weight * l1
        return out

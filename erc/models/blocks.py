"""Building blocks and losses shared by the models. Everything here respects the utterance mask:
padded positions never influence real ones, and never count in a loss.

Shapes: B dialogues, T utterances (padded), D features, C classes; `mask` is (B, T) bool, True = real.
"""

from __future__ import annotations

import itertools
import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from erc.data.dialogues import IGNORE

# ---------------------------------------------------------------- sequence helpers


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the real positions. x: (B, T, D) or (B, T); mask: (B, T) -> (B, D) or (B,)."""
    m = mask.to(x.dtype)
    if x.dim() == 3:
        m = m.unsqueeze(-1)
    return (x * m).sum(1) / m.sum(1).clamp(min=1)


def sinusoidal_positions(length: int, dim: int, device=None) -> torch.Tensor:
    """(T, D) fixed sine/cosine position encoding (Vaswani et al., 2017)."""
    position = torch.arange(length, device=device, dtype=torch.float32).unsqueeze(1)
    div = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    pe = torch.zeros(length, dim, device=device)
    pe[:, 0::2] = torch.sin(position * div)
    pe[:, 1::2] = torch.cos(position * div)[:, : dim // 2]
    return pe


class Packing:
    """The real positions of a padded batch. pack: (B, T, ...) -> (N, ...), the N real rows in batch-major order;
    unpack: back to (B, T, ...) with `fill` at the padded positions. Position-wise layers run on packed rows so
    that no work goes into padding."""

    def __init__(self, mask: torch.Tensor):
        self.mask = mask  # (B, T)
        self.index = mask.nonzero(as_tuple=True)  # (batch, time) of each real position, each (N,)

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        return x[self.index]

    def unpack(self, x: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        return x.new_full((*self.mask.shape, *x.shape[1:]), fill).index_put_(self.index, x)


class Dropout(nn.Dropout):
    """nn.Dropout with the keep mask drawn as `uniform >= p` (torch.rand_like) instead of by bernoulli_: the same
    distribution, and about half the time on CPU, where bernoulli_ draws one number at a time."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p in (0.0, 1.0):
            return super().forward(x)
        return x * torch.rand_like(x).ge_(self.p).div_(1 - self.p)


class MaskedConv1d(nn.Conv1d):
    """Conv1d over the utterance axis of (B, T, D) inputs; padded positions are zeroed before and after,
    so a real utterance's output is the same whatever padding follows it."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # (B, T, D_in) -> (B, T, D_out)
        x = x * mask.unsqueeze(-1).to(x.dtype)
        return super().forward(x.transpose(1, 2)).transpose(1, 2) * mask.unsqueeze(-1).to(x.dtype)

    def forward_packed(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # (N, D_in) -> (N, D_out)
        """Kernel size 1 only (a linear map per position), on packed positions (see Packing); mask: (N,)."""
        if self.kernel_size != (1,):
            raise ValueError("forward_packed needs kernel_size 1: a wider kernel mixes neighbouring positions")
        mask = mask.unsqueeze(-1).to(x.dtype)
        return F.linear(x * mask, self.weight.squeeze(-1), self.bias) * mask


def packed_rnn(rnn: nn.RNNBase, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A batch-first recurrent layer over the real utterances only (packed): (B, T, D) -> (B, T, out), zeros at
    padded positions."""
    lengths = mask.sum(1).clamp(min=1).cpu()
    packed = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
    out, _ = rnn(packed)
    out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])
    return out * mask.unsqueeze(-1).to(out.dtype)


class MaskedBiGRU(nn.Module):
    """Bidirectional GRU over the real utterances only (packed), zeros at padded positions. (B,T,D)->(B,T,2H)."""

    def __init__(self, dim: int, hidden: int, num_layers: int = 1, dropout: float = 0.0):
        super().__init__()
        self.gru = nn.GRU(dim, hidden, num_layers=num_layers, batch_first=True, bidirectional=True,
                          dropout=dropout if num_layers > 1 else 0.0)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return stacked_bigru([self], [x], mask)[0]

    def packed(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The same as `forward`, through nn.GRU on a packed sequence (what `forward` runs on a GPU)."""
        return packed_rnn(self.gru, x, mask)


class _GRURecurrence(torch.autograd.Function):
    """The recurrence of S GRUs of hidden size H over T steps from h = 0, PyTorch's cell (gates r, z, n):
        r, z = sigmoid(gi_rz + h W_rz + b_rz),  n = tanh(gi_n + r * (h W_n + b_n)),  h' = (1 - z) n + z h,
    gi (T, S, B, 3H) the input projections (bias included), w_hh (S, H, 3H), b_hh (S, 1, 3H) -> h (T, S, B, H).

    The backward is written out: autograd would record and replay a dozen small ops per step, most of the
    recurrence's time on a CPU. Here a step is four ops forward and six backward, into preallocated buffers,
    and the weight gradients are one matmul over all the steps after the loop."""

    @staticmethod
    def forward(ctx, gi: torch.Tensor, w_hh: torch.Tensor, b_hh: torch.Tensor) -> torch.Tensor:
        with torch.autocast(gi.device.type, enabled=False):  # in-place ops do not autocast: one dtype, the weights'
            ctx.gi_dtype = gi.dtype
            return _GRURecurrence.run(ctx, gi.to(w_hh.dtype), w_hh, b_hh.to(w_hh.dtype))

    @staticmethod
    def run(ctx, gi: torch.Tensor, w_hh: torch.Tensor, b_hh: torch.Tensor) -> torch.Tensor:
        T, S, B, H3 = gi.shape
        H = H3 // 3
        # gates[t] starts as (gi_rz + b_rz, b_n); the step's matmul adds h W in place, so it holds the r and z
        # pre-activations (then r and z themselves) and the n gate's h W_n + b_n, kept for the backward
        gates = torch.cat([gi[..., :2 * H] + b_hh[..., :2 * H], b_hh[..., 2 * H:].expand(T, S, B, H)], dim=-1)
        out, n = gi.new_empty(T, S, B, H), gi.new_empty(T, S, B, H)
        # every step's views taken up front (a Python index per step and tensor costs about as much as the op)
        steps = zip(gates.unbind(0), gates[..., :2 * H].unbind(0), gates[..., :H].unbind(0),
                    gates[..., H:2 * H].unbind(0), gates[..., 2 * H:].unbind(0), gi[..., 2 * H:].unbind(0),
                    n.unbind(0), out.unbind(0))
        h = gi.new_zeros(S, B, H)
        for gates_t, rz_t, r_t, z_t, gh_n_t, gi_n_t, n_t, out_t in steps:
            gates_t.baddbmm_(h, w_hh)
            rz_t.sigmoid_()
            torch.addcmul(gi_n_t, r_t, gh_n_t, out=n_t).tanh_()
            h = torch.lerp(n_t, h, z_t, out=out_t)  # n + z (h - n)
        ctx.save_for_backward(w_hh, out, gates, n)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        w_hh, out, gates, n = ctx.saved_tensors
        T, S, B, H = out.shape
        h_prev = torch.cat([out.new_zeros(1, S, B, H), out[:-1]])
        r, z, gh_n = gates[..., :H], gates[..., H:2 * H], gates[..., 2 * H:]
        # dh' -> the pre-activations: a_z = dh' (h - n) z (1 - z), a_n = dh' (1 - z) (1 - n^2), and from a_n:
        # a_r = a_n gh_n r (1 - r), a_n r (into h W_n + b_n). The factors that do not depend on dh', for all the
        # steps at once.
        to_z, to_n, to_r = (h_prev - n) * z * (1 - z), (1 - z) * (1 - n * n), gh_n * r * (1 - r)
        d_gh, d_n = out.new_empty(T, S, B, 3 * H), out.new_empty(T, S, B, H)  # d_gh: a_r, a_z, a_n r
        w = w_hh.transpose(1, 2)
        steps = list(zip(*(y.unbind(0) for y in (d_gh, d_gh[..., :H], d_gh[..., H:2 * H], d_gh[..., 2 * H:], d_n,
                                                  to_z, to_n, to_r, r, z))))
        g = grad_out.unbind(0)
        dh = g[T - 1]
        for t in range(T - 1, -1, -1):
            d_gh_t, a_r, a_z, a_nr, a_n, to_z_t, to_n_t, to_r_t, r_t, z_t = steps[t]
            torch.mul(dh, to_z_t, out=a_z)
            torch.mul(dh, to_n_t, out=a_n)
            torch.mul(a_n, to_r_t, out=a_r)
            torch.mul(a_n, r_t, out=a_nr)
            if t:  # dh of the step before: its own output's, through z, through the matmul
                dh = torch.addcmul(g[t - 1], dh, z_t).baddbmm_(d_gh_t, w)
        d_gi = torch.cat([d_gh[..., :2 * H], d_n], dim=-1)
        d_w = torch.bmm(h_prev.permute(1, 3, 0, 2).reshape(S, H, T * B), d_gh.transpose(0, 1).reshape(S, T * B, 3 * H))
        return d_gi.to(ctx.gi_dtype), d_w, d_gh.sum((0, 2)).unsqueeze(1)


def stacked_bigru(grus: list[MaskedBiGRU], xs: list[torch.Tensor], mask: torch.Tensor) -> list[torch.Tensor]:
    """Several MaskedBiGRUs of one shape, each on its own input (B, T, D), under one mask: the same outputs as
    their packed nn.GRUs (up to float summation order), computed as one recurrence over (GRU, direction) pairs.

    On a CPU the packed nn.GRU runs a dozen small ops per time step, layer, direction and GRU; here a time step
    is one batched matmul and a few element-wise ops for all of them (`_GRURecurrence`, backward written out), and
    the input projections of all time steps are one matmul per layer. The reverse direction runs forward over each
    dialogue reversed within its own length, so padding only ever follows the real utterances and never reaches
    them. Between layers, dropout as nn.GRU's (training only, not after the last layer; drawn as `Dropout` draws).
    On a GPU each GRU runs packed (cuDNN: one kernel)."""
    if mask.is_cuda:
        return [g.packed(x, mask) for g, x in zip(grus, xs)]
    first = grus[0].gru
    if any((g.gru.input_size, g.gru.hidden_size, g.gru.num_layers) != (first.input_size, first.hidden_size,
                                                                        first.num_layers) for g in grus):
        raise ValueError("stacked_bigru: the GRUs' shapes differ")
    B, T = mask.shape
    lengths = mask.sum(1, keepdim=True).clamp(min=1)  # (B, 1)
    steps = torch.arange(T, device=mask.device)
    reverse = torch.where(steps < lengths, lengths - 1 - steps, steps)  # (B, T): each dialogue reversed in place

    def flip(y: torch.Tensor) -> torch.Tensor:  # (..., B, T, F): reversed within each dialogue's length
        return y.gather(-2, reverse.unsqueeze(-1).expand(*y.shape))

    def weights(name: str) -> torch.Tensor:  # (G * 2, ...): per GRU, its forward then its reverse direction
        return torch.stack([getattr(g.gru, name + suffix) for g in grus for suffix in ("", "_reverse")])

    x = torch.stack(xs)  # (G, B, T, D)
    for layer in range(first.num_layers):
        both = torch.stack([x, flip(x)], dim=1).flatten(0, 1).flatten(1, 2)  # (G * 2, B * T, D_layer)
        gi = torch.baddbmm(weights(f"bias_ih_l{layer}").unsqueeze(1), both,
                           weights(f"weight_ih_l{layer}").transpose(1, 2)).unflatten(1, (B, T))  # (G*2, B, T, 3H)
        out = _GRURecurrence.apply(gi.permute(2, 0, 1, 3), weights(f"weight_hh_l{layer}").transpose(1, 2),
                                   weights(f"bias_hh_l{layer}").unsqueeze(1))  # (T, G * 2, B, H)
        out = out.permute(1, 2, 0, 3).unflatten(0, (-1, 2))  # (G, 2, B, T, H)
        x = torch.cat([out[:, 0], flip(out[:, 1])], dim=-1)  # (G, B, T, 2H), time order
        if layer < first.num_layers - 1:
            x = _dropout(x, first.dropout, first.training)  # nn.GRU's between layers (`Dropout`'s draw)
    keep = mask.unsqueeze(-1).to(x.dtype)
    return [y * keep for y in x]


# ---------------------------------------------------------------- attention


class AttentionBlock(nn.Module):
    """Multi-head attention of `query` over `context` (self-attention when they are the same), then
    dropout, residual and LayerNorm; optionally a position-wise feed-forward sub-layer likewise (`norm="post"`), or
    SDT's form with one LayerNorm before the feed-forward and none on the residual stream (`norm="pre_ff"`).

    `attn_dim` lets the attention run in a smaller space than the model (MiSTER-E: 1024 -> 120, 3 heads).
    Padded context positions are excluded by the key padding mask; padded query rows are zeroed. The
    position-wise layers see the real positions only (`forward_packed`); only the attention is padded.
    """

    def __init__(self, dim: int, heads: int, *, attn_dim: int | None = None, ff_dim: int = 0,
                 dropout: float = 0.1, attn_dropout: float = 0.1, norm: Literal["post", "pre_ff"] = "post"):
        super().__init__()
        if norm not in ("post", "pre_ff"):
            raise ValueError(f"norm {norm!r}: post or pre_ff")
        if norm == "pre_ff" and not ff_dim:
            raise ValueError("norm pre_ff needs a feed-forward sub-layer (ff_dim)")
        attn_dim = attn_dim or dim
        self.q, self.k, self.v = nn.Linear(dim, attn_dim), nn.Linear(dim, attn_dim), nn.Linear(dim, attn_dim)
        self.out = nn.Linear(attn_dim, dim)
        self.heads, self.attn_dropout, self.norm_style = heads, attn_dropout, norm
        self.dropout = Dropout(dropout)
        # post: LayerNorm after each residual, ReLU (Vaswani et al.). pre_ff: the one-layer encoder of the SDT code
        # (after OpenNMT's): nothing around the attention, LayerNorm (eps 1e-6) before the feed-forward, GELU (tanh
        # form), so the residual stream is never normalised.
        self.norm = nn.LayerNorm(dim) if norm == "post" else nn.Identity()
        self.ff = None
        if ff_dim:
            act = nn.ReLU() if norm == "post" else nn.GELU(approximate="tanh")
            self.ff = nn.Sequential(nn.Linear(dim, ff_dim), act, Dropout(dropout), nn.Linear(ff_dim, dim))
            self.ff_norm = nn.LayerNorm(dim) if norm == "post" else nn.LayerNorm(dim, eps=1e-6)

    def forward(self, query: torch.Tensor, context: torch.Tensor, mask: torch.Tensor,
                attn_bias: torch.Tensor | None = None) -> torch.Tensor:
        """query, context: (B, T, D); mask: (B, T); attn_bias: optional (B, heads, T, T) added to the scores."""
        packing = Packing(mask)
        return packing.unpack(self.forward_packed(packing.pack(query), packing.pack(context), packing, attn_bias))

    def forward_packed(self, query: torch.Tensor, context: torch.Tensor, packing: Packing,
                       attn_bias: torch.Tensor | None = None) -> torch.Tensor:
        """query, context: (N, D), the real positions of `packing`; returns (N, D)."""
        B, T = packing.mask.shape
        heads = lambda x: x.view(B, T, self.heads, -1).transpose(1, 2)  # noqa: E731  (B, h, T, d_h)
        # The projections that share an input run as one matmul, unpacked once (self-attention: q, k, v; else k, v)
        fused = [self.q, self.k, self.v] if context is query else [self.k, self.v]
        projected = packing.unpack(F.linear(context, torch.cat([p.weight for p in fused]),
                                            torch.cat([p.bias for p in fused]))).chunk(len(fused), dim=-1)
        if context is not query:
            projected = (packing.unpack(self.q(query)), *projected)
        q, k, v = map(heads, projected)
        keep = packing.mask[:, None, None, :]  # (B, 1, 1, T): the real keys
        scores_mask = keep if attn_bias is None else attn_bias.masked_fill(~keep, float("-inf"))
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=scores_mask,
                                                  dropout_p=self.attn_dropout if self.training else 0.0)
        attended = packing.pack(attended.transpose(1, 2)).flatten(1)  # (N, attn_dim)
        x = self.norm(query + self.dropout(self.out(attended)))
        if self.ff is None:
            return x
        if self.norm_style == "pre_ff":
            return x + self.dropout(self.ff(self.ff_norm(x)))
        return self.ff_norm(x + self.dropout(self.ff(x)))


def _dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """`Dropout`'s draw (uniform >= p), as a function."""
    if not training or p == 0.0:
        return x
    return x * torch.rand_like(x).ge_(p).div_(1 - p)


def stacked_attention_weights(calls: list[list[AttentionBlock]]) -> list[dict[str, torch.Tensor]]:
    """The parameters of several `stacked_attention` calls (blocks of one shape, as many per call), stacked once:
    one op per kind of parameter for all the calls, not one per block and call. Returns each call's `weights`."""
    flat = [b for blocks in calls for b in blocks]
    first, (C, G) = flat[0], (len(calls), len(calls[0]))
    if any(len(blocks) != G for blocks in calls):
        raise ValueError("stacked_attention_weights: every call needs as many blocks")
    if any(b.ff is not None for b in flat) or first.norm_style != "post":
        raise ValueError("stacked_attention: post-norm blocks without a feed-forward only")
    shape = lambda b: (b.q.weight.shape, b.heads, b.attn_dropout, b.dropout.p, b.norm.eps)  # noqa: E731
    if any(shape(b) != shape(first) for b in flat):
        raise ValueError("stacked_attention: the blocks' shapes differ")
    A, D = first.q.weight.shape
    stacked = {
        "qkv_weight": torch.stack([p.weight for b in flat for p in (b.q, b.k, b.v)]).view(C, G, 3 * A, D),
        "qkv_bias": torch.stack([p.bias for b in flat for p in (b.q, b.k, b.v)]).view(C, G, 1, 3 * A),
        "out_weight": torch.stack([b.out.weight for b in flat]).view(C, G, D, A),
        "out_bias": torch.stack([b.out.bias for b in flat]).view(C, G, 1, D),
        "norm_weight": torch.stack([b.norm.weight for b in flat]).view(C, G, 1, D),
        "norm_bias": torch.stack([b.norm.bias for b in flat]).view(C, G, 1, D)}
    per_call = {k: v.unbind(0) for k, v in stacked.items()}  # unbind: its backward is one stack, not C copies
    return [{k: v[c] for k, v in per_call.items()} for c in range(C)]


def stacked_attention(blocks: list[AttentionBlock], query: torch.Tensor, context: torch.Tensor | None,
                      mask: torch.Tensor, weights: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """G AttentionBlocks of one shape (post-norm, no feed-forward: MiSTER-E's), block g on query[g] over
    context[g] (None: self-attention), both (G, B, T, D), under one mask (B, T): (G, B, T, D), at the real
    positions the same as each block's own `forward` (up to float summation order); the padded rows are left
    unspecified (finite): the caller masks them. `weights`: the blocks' parameters from
    `stacked_attention_weights` (stacked here when not given).

    On a CPU these blocks are small enough that the launch of each op outweighs its arithmetic: here G blocks cost
    the ops of one, each projection one batched matmul. They run padded, with the softmax written out (the
    attention-weight dropout as `Dropout`'s, rather than SDPA's bernoulli draw, several times slower on CPU);
    padded keys get no weight, so padding never reaches a real position."""
    w = weights if weights is not None else stacked_attention_weights([blocks])[0]
    first = blocks[0]
    return _stacked_attention(w, first.heads, first.attn_dropout, first.dropout.p, first.norm.eps, first.training,
                              query, context, mask)


def _stacked_attention(w: dict[str, torch.Tensor], H: int, attn_dropout: float, dropout: float, eps: float,
                       training: bool, query: torch.Tensor, context: torch.Tensor | None,
                       mask: torch.Tensor) -> torch.Tensor:
    """`stacked_attention` from the stacked parameters `w` and the blocks' settings (H heads)."""
    (G, B, T, D), A = query.shape, w["qkv_weight"].shape[-2] // 3

    def project(x: torch.Tensor, rows: slice) -> torch.Tensor:  # (G, B, T, D) -> (G, B * T, rows of q|k|v)
        return torch.baddbmm(w["qkv_bias"][..., rows], x.flatten(1, 2), w["qkv_weight"][:, rows].transpose(1, 2))

    if context is None:  # q, k, v from one input: one matmul
        q, k, v = project(query, slice(None)).chunk(3, dim=-1)
    else:
        q, (k, v) = project(query, slice(A)), project(context, slice(A, None)).chunk(2, dim=-1)
    heads = lambda t: t.reshape(G * B, T, H, -1).transpose(1, 2).flatten(0, 1)  # noqa: E731  (G*B*H, T, d_h)
    # Scores transposed, (keys, queries): a softmax over the second-last dim is ~3x faster on CPU than over a
    # short last one. The padded keys' -inf, the scale and the matmul are one baddbmm.
    key_bias = torch.zeros(B, T, 1, dtype=query.dtype, device=query.device).masked_fill_(~mask.unsqueeze(-1), -math.inf)
    key_bias = key_bias.unsqueeze(1).expand(G, B, H, T, 1).reshape(G * B * H, T, 1)
    scores = torch.baddbmm(key_bias, heads(k), heads(q).transpose(1, 2), alpha=(A // H) ** -0.5)
    attention = _dropout(scores.softmax(-2), attn_dropout, training)  # (G*B*H, T keys, T queries)
    attended = torch.bmm(attention.transpose(1, 2), heads(v)).view(G, B, H, T, -1).transpose(2, 3).reshape(G, B * T, A)
    out = torch.baddbmm(w["out_bias"], attended, w["out_weight"].transpose(1, 2))
    x = query.flatten(1, 2) + _dropout(out, dropout, training)
    x = torch.addcmul(w["norm_bias"], F.layer_norm(x, (D,), eps=eps), w["norm_weight"])
    return x.view(G, B, T, D)


class StackedAttention(nn.Module):
    """The AttentionBlocks of C `stacked_attention` calls of G blocks each (one shape), their parameters held
    already stacked, (C, G, ...) per kind: a forward stacks no weights, the backward writes each kind's gradient
    once, and the optimizer and the gradient clipping see six tensors for all the blocks, not ten per block (on a
    CPU their per-tensor ops cost more than the arithmetic). Built from the blocks: their initial values, copied.

    `weights()` gives each call's parameters, then `forward(weights()[c], query, context, mask)` is
    `stacked_attention(calls[c], query, context, mask)`."""

    def __init__(self, calls: list[list[AttentionBlock]]):
        super().__init__()
        first, self.calls = calls[0][0], len(calls)
        self.heads, self.attn_dropout, self.dropout, self.eps = first.heads, first.attn_dropout, first.dropout.p, \
            first.norm.eps
        per_call = stacked_attention_weights(calls)
        with torch.no_grad():
            for name in per_call[0]:
                self.register_parameter(name, nn.Parameter(torch.stack([w[name] for w in per_call])))

    def weights(self) -> list[dict[str, torch.Tensor]]:
        """Each call's parameters, (G, ...) views: one unbind per kind (its backward is one stack, not C copies)."""
        per_kind = {name: p.unbind(0) for name, p in self.named_parameters(recurse=False)}
        return [{name: v[c] for name, v in per_kind.items()} for c in range(self.calls)]

    def forward(self, weights: dict[str, torch.Tensor], query: torch.Tensor, context: torch.Tensor | None,
                mask: torch.Tensor) -> torch.Tensor:
        return _stacked_attention(weights, self.heads, self.attn_dropout, self.dropout, self.eps, self.training,
                                  query, context, mask)


# ---------------------------------------------------------------- experts


class LowRankExpert(nn.Module):
    """MMoLRE's low-rank expert: Conv1d k=3 (D -> r), activation, Conv1d k=1 (r -> D), over utterances."""

    def __init__(self, dim: int, rank: int):
        super().__init__()
        self.down = MaskedConv1d(dim, rank, kernel_size=3, padding=1)
        self.up = MaskedConv1d(rank, dim, kernel_size=1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.up(F.gelu(self.down(x, mask)), mask)


def stacked_conv1d(convs: list[MaskedConv1d], x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Several MaskedConv1d of odd kernels and "same" padding (k // 2) on one input, as one matmul per run of convs
    of one kernel size: their outputs concatenated, (B, T, D) -> (B, T, sum of out channels), the same as each
    conv's own (up to float summation order). A convolution is a linear map of the window around each position
    (masked inputs, zeros beyond the ends). The windows are laid out (B, T, D, K) like the conv weights
    (out, D, k), so a weight is used as it is stored (no transposed copy of it each step), and a narrower kernel
    reads the middle taps of the widest window (no zero-padded weights: no multiplications by zero)."""
    if any(c.kernel_size[0] % 2 == 0 or c.padding != (c.kernel_size[0] // 2,) or c.stride != (1,)
           or c.dilation != (1,) or c.groups != 1 for c in convs):
        raise ValueError("stacked_conv1d: odd kernels with padding k // 2, stride, dilation and groups 1 only")
    K, T = max(c.kernel_size[0] for c in convs), x.shape[1]
    keep = mask.unsqueeze(-1).to(x.dtype)
    x = x * keep
    if K > 1:
        padded = F.pad(x, (0, 0, K // 2, K // 2))  # (B, T + K - 1, D)
        windows = torch.stack([padded[:, j:j + T] for j in range(K)], dim=-1)  # (B, T, D, K)
    outs = []
    for k, run in itertools.groupby(convs, key=lambda c: c.kernel_size[0]):
        run = list(run)
        weight, bias = (run[0].weight, run[0].bias) if len(run) == 1 else \
            (torch.cat([c.weight for c in run]), torch.cat([c.bias for c in run]))
        taps = x if k == 1 else windows[..., (K - k) // 2:(K + k) // 2].flatten(2)  # (B, T, D * k)
        outs.append(F.linear(taps, weight.flatten(1), bias))
    return (outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)) * keep


def low_rank_down(experts: list[LowRankExpert], x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The first half of every expert in `experts` on the same input, as one matmul (`stacked_conv1d`):
    GELU(down(x)) of each, concatenated, (B, T, D) -> (B, T, E * r)."""
    return F.gelu(stacked_conv1d([e.down for e in experts], x, mask))


def low_rank_mix(experts: list[LowRankExpert], hidden: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """sum_e gates_e * up_e(hidden_e): the experts' second halves, gated and summed, as one matmul.
    hidden (B, T, E * r) from `low_rank_down`, gates (B, T, E) -> (B, T, D); unmasked (the caller masks)."""
    E = len(experts)
    gated = (hidden.unflatten(-1, (E, -1)) * gates.unsqueeze(-1)).flatten(-2)  # (B, T, E * r)
    weight = torch.cat([e.up.weight.squeeze(-1) for e in experts], dim=1)  # (D, E * r)
    return F.linear(gated, weight) + gates @ torch.stack([e.up.bias for e in experts])


# ---------------------------------------------------------------- routing (MMoLRE, SUMMER)


def top_k_gates(router_logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over experts, keep the top k, renormalise. (B, T, E) -> gates (B, T, E) with k non-zeros, probs."""
    probs = router_logits.softmax(-1)
    kept, index = probs.topk(k, dim=-1)
    gates = torch.zeros_like(probs).scatter(-1, index, kept / kept.sum(-1, keepdim=True))
    return gates, probs


def load_balance(probs: torch.Tensor, gates: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Switch Transformer auxiliary loss E * sum_e f_e P_e over the real positions; 1 when routing is uniform.

    probs, gates: (B, T, E); mask: (B, T). f_e: share of the chosen (top-k) slots going to expert e
    (not differentiable); P_e: mean router probability of e (carries the gradient).
    """
    m = mask.to(probs.dtype).unsqueeze(-1)
    n = m.sum()
    if n == 0:
        return probs.sum() * 0.0
    chosen = (gates > 0).to(probs.dtype) * m
    f = chosen.sum((0, 1)) / chosen.sum()
    p = (probs * m).sum((0, 1)) / n
    return probs.shape[-1] * (f * p).sum()


# ---------------------------------------------------------------- losses


def _flat(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    keep = labels != IGNORE
    return logits[keep], labels[keep]


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean CE over labelled utterances. logits (B, T, C), labels (B, T) with IGNORE for padding."""
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), weight=weight, ignore_index=IGNORE)


def focal_loss(logits: torch.Tensor, labels: torch.Tensor, gamma: float = 2.0,
               weight: torch.Tensor | None = None) -> torch.Tensor:
    """Focal loss (Lin et al., 2017), mean over labelled utterances: -(1 - p_y)^gamma log p_y."""
    z, y = _flat(logits, labels)
    if len(y) == 0:
        return logits.sum() * 0.0
    logp = F.log_softmax(z, -1).gather(1, y[:, None]).squeeze(1)
    loss = -((1 - logp.exp()) ** gamma) * logp
    if weight is not None:
        w = weight[y]
        return (loss * w).sum() / w.sum()
    return loss.mean()



def focal_losses(logits: torch.Tensor, labels: torch.Tensor, gamma: float = 2.0,
                 weight: torch.Tensor | None = None) -> torch.Tensor:
    """`focal_loss` of K sets of logits at once: (B, T, K, C), labels (B, T) -> (K,), each the same as
    focal_loss(logits[..., k, :], labels, gamma, weight) (up to float summation order)."""
    keep = labels != IGNORE
    z, y = logits[keep], labels[keep]  # (N, K, C), (N,)
    if len(y) == 0:
        return logits.sum((0, 1, 3)) * 0.0
    logp = F.log_softmax(z, -1).gather(-1, y[:, None, None].expand(-1, z.shape[1], 1)).squeeze(-1)  # (N, K)
    loss = -((1 - logp.exp()) ** gamma) * logp
    if weight is not None:
        w = weight[y]
        return (loss * w[:, None]).sum(0) / w.sum()
    return loss.mean(0)

def supervised_contrastive(features: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """SupCon (Khosla et al., 2020) over the labelled utterances of the batch; features (B, T, D) or (N, D).

    Positives of an anchor: the other utterances with its label (padding excluded). Anchors without a
    positive are skipped. Features are L2-normalised.
    """
    if features.dim() == 3:
        features, labels = features.flatten(0, 1), labels.flatten()
    keep = labels != IGNORE
    z, y = F.normalize(features[keep], dim=-1), labels[keep]
    n = len(y)
    if n < 2:
        return features.sum() * 0.0
    logits = z @ z.T / temperature
    self_mask = torch.eye(n, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_mask, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    positives = (y[:, None] == y[None, :]) & ~self_mask
    has_pos = positives.any(1)
    if not has_pos.any():
        return features.sum() * 0.0
    mean_log_prob = log_prob.masked_fill(~positives, 0.0).sum(1) / positives.sum(1).clamp(min=1)
    return -mean_log_prob[has_pos].mean()


def kl_distill(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor, *,
               temperature: float = 1.0, detach_teacher: bool = True, t_squared: bool = False) -> torch.Tensor:
    """KL(teacher_T || student_T) per utterance, averaged over real utterances: the usual distillation term
    `KL(softmax(z_t/T) || softmax(z_s/T))`, computed as kl_div(log_softmax(z_s/T), softmax(z_t/T)).

    detach_teacher stops gradients into the teacher (the released SDT code does not, and its padded zero
    targets then give NaN gradients); t_squared multiplies by T^2 (Hinton et al., 2015).
    """
    if detach_teacher:
        teacher_logits = teacher_logits.detach()
    s = F.log_softmax(student_logits[mask] / temperature, -1)
    t = F.log_softmax(teacher_logits[mask] / temperature, -1)
    if len(s) == 0:
        return student_logits.sum() * 0.0
    loss = F.kl_div(s, t, reduction="batchmean", log_target=True)
    return loss * temperature ** 2 if t_squared else loss


def symmetric_kl(a_logits: torch.Tensor, b_logits: torch.Tensor, mask: torch.Tensor,
                 temperature: float = 1.0) -> torch.Tensor:
    """(KL(a||b) + KL(b||a)) / 2 over real utterances, gradients into both (MiSTER-E's expert consistency)."""
    return 0.5 * (kl_distill(a_logits, b_logits, mask, temperature=temperature, detach_teacher=False)
                  + kl_distill(b_logits, a_logits, mask, temperature=temperature, detach_teacher=False))



def mean_symmetric_kl(logits: torch.Tensor, mask: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """`symmetric_kl` averaged over every pair of E sets of logits (B, T, E, C), at once: KL(a||b) + KL(b||a) is
    sum_c (p_a - p_b)(log p_a - log p_b), one product per pair instead of two kl_div per pair."""
    E = logits.shape[-2]
    logp = F.log_softmax(logits[mask] / temperature, -1)  # (N, E, C)
    if len(logp) == 0:
        return logits.sum() * 0.0
    first, second = torch.triu_indices(E, E, offset=1, device=logits.device)
    p = logp.exp()
    per_pair = ((p[:, first] - p[:, second]) * (logp[:, first] - logp[:, second])).sum((0, 2))  # (pairs,)
    return 0.5 * per_pair.mean() / len(logp)

def score_l1(score: torch.Tensor | None, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor | None:
    """L1 on the continuous sentiment where there is one (MOSI); None when the dataset has none."""
    if score is None:
        return None
    has = mask & ~torch.isnan(target)
    if not has.any():
        return None
    return F.l1_loss(score[has], target[has])

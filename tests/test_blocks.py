"""Shared blocks (erc/models/blocks.py) against the formulas they implement, on random tensors."""

import math

import pytest
import torch

from erc.models.blocks import AttentionBlock, Dropout, MaskedConv1d, Packing

B, T, D, HEADS = 3, 6, 16, 4
LENGTHS = [6, 2, 4]


def padded_attention(block: AttentionBlock, query, context, mask, attn_bias=None):
    """The block's function written out on the padded batch (eval mode): softmax attention over the real keys,
    residual + LayerNorm, feed-forward residual + LayerNorm, padded rows zeroed."""
    split = lambda x: x.view(B, T, block.heads, -1).transpose(1, 2)  # noqa: E731  (B, h, T, d_h)
    q, k, v = split(block.q(query)), split(block.k(context)), split(block.v(context))
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if attn_bias is not None:
        scores = scores + attn_bias
    scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    attended = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, -1)
    x = block.norm(query + block.out(attended))
    if block.ff is not None:
        x = block.ff_norm(x + block.ff(x))
    return x * mask.unsqueeze(-1)


@pytest.mark.parametrize("kind", ["feed-forward (SDT)", "attention bias (SUMMER)", "attn_dim (MiSTER-E)"])
def test_attention_block_is_the_padded_formula(kind):
    torch.manual_seed(0)
    block = (AttentionBlock(D, HEADS, attn_dim=8) if "attn_dim" in kind else AttentionBlock(D, HEADS, ff_dim=D)).eval()
    mask = torch.arange(T) < torch.tensor(LENGTHS)[:, None]
    query, context = torch.randn(B, T, D, requires_grad=True), torch.randn(B, T, D, requires_grad=True)
    bias = torch.randn(B, HEADS, T, T) if "bias" in kind else None
    weights = torch.randn(B, T, D)  # a loss that weighs every output differently
    leaves = [query, context, *block.parameters()]
    got = block(query, context, mask, attn_bias=bias)
    want = padded_attention(block, query, context, mask, attn_bias=bias)
    torch.testing.assert_close(got, want)
    assert (got[~mask] == 0).all()
    for g, w in zip(torch.autograd.grad((got * weights).sum(), leaves),
                    torch.autograd.grad((want * weights).sum(), leaves)):
        torch.testing.assert_close(g, w)


def test_packing_round_trip():
    mask = torch.arange(T) < torch.tensor(LENGTHS)[:, None]
    x = torch.randn(B, T, 2, D)
    packing = Packing(mask)
    packed = packing.pack(x)
    assert packed.shape == (sum(LENGTHS), 2, D)
    torch.testing.assert_close(packed, x[mask])
    unpacked = packing.unpack(packed, fill=-1.0)
    torch.testing.assert_close(unpacked[mask], x[mask])
    assert (unpacked[~mask] == -1.0).all()


def test_dropout_keeps_each_unit_with_probability_1_minus_p_and_rescales():
    torch.manual_seed(0)
    dropout = Dropout(0.3)
    x = torch.ones(200_000, requires_grad=True)
    y = dropout(x)
    kept = y != 0
    torch.testing.assert_close(y[kept], torch.full_like(y[kept], 1 / 0.7))
    assert kept.float().mean().item() == pytest.approx(0.7, abs=0.01)
    y.sum().backward()
    torch.testing.assert_close(x.grad, kept.float() / 0.7)  # the gradient flows through the kept units only
    assert torch.equal(dropout.eval()(x), x)
    assert torch.equal(Dropout(0.0)(x), x) and (Dropout(1.0)(x) == 0).all()


def test_masked_conv1d_packed_is_the_padded_convolution_at_the_real_positions():
    torch.manual_seed(0)
    mask = torch.arange(T) < torch.tensor(LENGTHS)[:, None]
    present = mask & (torch.rand(B, T) > 0.3)  # some real positions lack the modality
    conv, x = MaskedConv1d(D, 8, kernel_size=1), torch.randn(B, T, D)
    packing = Packing(mask)
    torch.testing.assert_close(conv.forward_packed(packing.pack(x), packing.pack(present)),
                               packing.pack(conv(x, present)))
    with pytest.raises(ValueError, match="kernel_size 1"):
        MaskedConv1d(D, 8, kernel_size=3, padding=1).forward_packed(packing.pack(x), packing.pack(present))


def test_pre_ff_norm_is_the_official_sdt_encoder_layer():
    """norm="pre_ff": the SDT code's one-layer encoder (model.py TransformerEncoderLayer at iter 0 and
    PositionwiseFeedForward): out = attention + query, unnormalised; y = out + W2·gelu_tanh(W1·LN(out)), LN eps 1e-6."""
    torch.manual_seed(0)
    block = AttentionBlock(D, HEADS, ff_dim=2 * D, norm="pre_ff").eval()
    mask = torch.arange(T) < torch.tensor(LENGTHS)[:, None]
    query, context = torch.randn(B, T, D), torch.randn(B, T, D)
    split = lambda x: x.view(B, T, HEADS, -1).transpose(1, 2)  # noqa: E731
    q, k, v = split(block.q(query)), split(block.k(context)), split(block.v(context))
    scores = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).masked_fill(~mask[:, None, None, :], -1e10)
    out = block.out((scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, -1)) + query
    first, second = block.ff[0], block.ff[3]
    normed = torch.nn.functional.layer_norm(out, (D,), block.ff_norm.weight, block.ff_norm.bias, eps=1e-6)
    inner = first(normed)
    gelu = 0.5 * inner * (1 + torch.tanh(math.sqrt(2 / math.pi) * (inner + 0.044715 * inner.pow(3))))  # the code's gelu
    want = (out + second(gelu)) * mask.unsqueeze(-1)
    torch.testing.assert_close(block(query, context, mask), want)
    assert block.ff_norm.eps == 1e-6 and isinstance(block.norm, torch.nn.Identity)
    with pytest.raises(ValueError, match="pre_ff needs a feed-forward"):
        AttentionBlock(D, HEADS, norm="pre_ff")

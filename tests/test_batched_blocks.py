"""The batched forms of erc.models.blocks' layers (issue 33: MMoLRE's and MiSTER-E's epochs) against the layers
they replace: several GRUs as one recurrence (its backward written out), several convolutions as one matmul, several
attention blocks as one, the losses of several sets of logits at once, and AdamW fused."""

import pytest
import torch
from torch import nn

from erc.models.blocks import (AttentionBlock, MaskedBiGRU, MaskedConv1d, _GRURecurrence, focal_loss, focal_losses,
                               StackedAttention, mean_symmetric_kl, stacked_attention, stacked_attention_weights,
                               stacked_bigru, stacked_conv1d, symmetric_kl)
from tests.fixtures import one_torch_thread

MASK = torch.tensor([[True] * 6, [True, True, True, False, False, False], [True] + [False] * 5])


@pytest.fixture(autouse=True)
def one_thread():
    with one_torch_thread():
        yield


def outputs_and_grads(fn, inputs: list[torch.Tensor], modules: list[nn.Module]):
    """fn(inputs) -> list of outputs; returns them with the gradients of a fixed random projection of them."""
    inputs = [x.detach().requires_grad_() for x in inputs]
    for m in modules:
        m.zero_grad()
    outs = fn(inputs)
    weight = torch.Generator().manual_seed(7)
    sum((o * torch.randn(o.shape, generator=weight)).sum() for o in outs).backward()
    return outs, [x.grad for x in inputs] + [p.grad.clone() for m in modules for p in m.parameters()]


@pytest.mark.parametrize("layers", [1, 3])
def test_stacked_bigru_equals_each_packed_gru(layers):
    """Two bidirectional GRUs as one recurrence equal nn.GRU on packed sequences, outputs and gradients, for
    dialogues of every length (the reverse direction must start at each dialogue's own last utterance)."""
    torch.manual_seed(0)
    grus = [MaskedBiGRU(5, 4, num_layers=layers).eval() for _ in range(2)]
    xs = [torch.randn(3, 6, 5) for _ in grus]
    stacked, stacked_grads = outputs_and_grads(lambda xs: stacked_bigru(grus, xs, MASK), xs, grus)
    packed, packed_grads = outputs_and_grads(lambda xs: [g.packed(x, MASK) for g, x in zip(grus, xs)], xs, grus)
    for a, b in zip(stacked + stacked_grads, packed + packed_grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert (stacked[0][~MASK] == 0).all() and stacked[0][MASK].abs().min() > 0
    torch.testing.assert_close(grus[0](xs[0], MASK), packed[0].detach(), atol=1e-6, rtol=1e-5)  # forward: the same


def test_stacked_bigru_runs_several_grus_in_the_kernels_of_one():
    """The point of stacking: two GRUs launch no more matrix kernels than one."""
    from tests.test_model_mmolre import matmul_kernels

    torch.manual_seed(0)
    grus = [MaskedBiGRU(5, 4, num_layers=2) for _ in range(2)]
    xs = [torch.randn(3, 6, 5) for _ in grus]
    one = matmul_kernels(lambda: stacked_bigru(grus[:1], xs[:1], MASK)[0].sum().backward())
    two = matmul_kernels(lambda: sum(o.sum() for o in stacked_bigru(grus, xs, MASK)).backward())
    assert one == two


def test_stacked_bigru_refuses_grus_of_different_shapes():
    with pytest.raises(ValueError, match="shapes differ"):
        stacked_bigru([MaskedBiGRU(5, 4), MaskedBiGRU(5, 3)], [torch.zeros(3, 6, 5)] * 2, MASK)


def test_stacked_conv1d_equals_each_masked_conv():
    """MiSTER-E's kernel-1, -3 and -5 branches as one matmul over one window equal the three convolutions."""
    torch.manual_seed(0)
    convs = [MaskedConv1d(5, 4, kernel_size=k, padding=k // 2) for k in (1, 3, 5)]
    x = torch.randn(3, 6, 5)
    (stacked,), stacked_grads = outputs_and_grads(lambda xs: [stacked_conv1d(convs, xs[0], MASK)], [x], convs)
    (looped,), looped_grads = outputs_and_grads(lambda xs: [torch.cat([c(xs[0], MASK) for c in convs], -1)], [x], convs)
    torch.testing.assert_close(stacked, looped, atol=1e-6, rtol=1e-5)
    for a, b in zip(stacked_grads, looped_grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="odd kernels"):
        stacked_conv1d([MaskedConv1d(5, 4, kernel_size=2, padding=1)], x, MASK)


@pytest.mark.parametrize("self_attention", [True, False])
def test_attention_with_fused_projections_equals_separate_ones(self_attention):
    """AttentionBlock runs the projections that share an input as one matmul: the same as q, k, v one by one."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    block = AttentionBlock(8, 2, attn_dim=6).eval()
    query = torch.randn(3, 6, 8)
    context = query if self_attention else torch.randn(3, 6, 8)
    B, T = MASK.shape
    heads = lambda t: t.view(B, T, 2, -1).transpose(1, 2)  # noqa: E731
    q, k, v = heads(block.q(query)), heads(block.k(context)), heads(block.v(context))
    attended = F.scaled_dot_product_attention(q, k, v, attn_mask=MASK[:, None, None, :]).transpose(1, 2).flatten(2)
    expected = block.norm(query + block.out(attended)) * MASK.unsqueeze(-1)
    torch.testing.assert_close(block(query, context, MASK), expected, atol=1e-6, rtol=1e-5)



def test_gru_recurrence_backward_is_the_gradient():
    """The recurrence's hand-written backward against finite differences (float64), weights and inputs."""
    torch.manual_seed(0)
    T, S, B, H = 4, 2, 3, 2
    gi = torch.randn(T, S, B, 3 * H, dtype=torch.float64, requires_grad=True)
    w_hh = torch.randn(S, H, 3 * H, dtype=torch.float64, requires_grad=True)
    b_hh = torch.randn(S, 1, 3 * H, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_GRURecurrence.apply, (gi, w_hh, b_hh))


@pytest.mark.parametrize("self_attention", [True, False])
def test_stacked_attention_equals_each_block(self_attention):
    """Two AttentionBlocks as one (MiSTER-E's pairs): each block's own forward at the real positions, outputs and
    the gradients of inputs and parameters (eval mode: no dropout to draw)."""
    torch.manual_seed(0)
    blocks = [AttentionBlock(8, 2, attn_dim=6).eval() for _ in range(2)]
    keep = MASK.unsqueeze(-1).float()
    inputs = [torch.randn(3, 6, 8) for _ in range(2 if self_attention else 4)]

    def stacked(xs):
        query = torch.stack(xs[:2])
        out = stacked_attention(blocks, query, None if self_attention else torch.stack(xs[2:]), MASK)
        return [y * keep for y in out]

    def looped(xs):
        contexts = xs[:2] if self_attention else xs[2:]
        return [b(q, c, MASK) * keep for b, q, c in zip(blocks, xs[:2], contexts)]

    got, got_grads = outputs_and_grads(stacked, inputs, blocks)
    want, want_grads = outputs_and_grads(looped, inputs, blocks)
    assert want[0].abs().sum() > 0
    for a, b in zip(got + got_grads, want + want_grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    weights = stacked_attention_weights([blocks, blocks[::-1]])  # several calls' parameters stacked at once
    torch.testing.assert_close(stacked_attention(blocks[::-1], torch.stack(inputs[:2]), None, MASK, weights[1]),
                               stacked_attention(blocks[::-1], torch.stack(inputs[:2]), None, MASK))


@pytest.mark.parametrize("self_attention", [True, False])
def test_stacked_attention_module_equals_the_blocks_it_is_built_from(self_attention):
    """StackedAttention holds several calls' blocks' parameters stacked (copies of their values): in training mode,
    with the same dropout draws, each call the same outputs as stacked_attention on its blocks, and the blocks'
    gradients stacked."""
    torch.manual_seed(0)
    calls = [[AttentionBlock(8, 2, attn_dim=6, dropout=0.3, attn_dropout=0.2) for _ in range(2)] for _ in range(3)]
    module = StackedAttention(calls)
    query, context = torch.randn(2, 3, 6, 8), None if self_attention else torch.randn(2, 3, 6, 8)
    weights = module.weights()
    for c, blocks in enumerate(calls):
        torch.manual_seed(c)
        want = stacked_attention(blocks, query, context, MASK)
        torch.manual_seed(c)
        got = module(weights[c], query, context, MASK)
        torch.testing.assert_close(got, want, atol=0, rtol=0)
        (want * MASK[..., None]).sum().backward()
        (got * MASK[..., None]).sum().backward(retain_graph=True)
    for name, p in module.named_parameters():
        assert p.shape == (3, *stacked_attention_weights([calls[0]])[0][name].shape), name
    torch.testing.assert_close(module.qkv_weight.grad, torch.stack(
        [torch.stack([torch.cat([b.q.weight.grad, b.k.weight.grad, b.v.weight.grad]) for b in blocks])
         for blocks in calls]))
    torch.testing.assert_close(module.norm_weight.grad.squeeze(2),
                               torch.stack([torch.stack([b.norm.weight.grad for b in blocks]) for blocks in calls]))
    assert module.qkv_weight.grad.abs().sum() > 0


def test_stacked_attention_refuses_blocks_it_does_not_cover():
    with pytest.raises(ValueError, match="feed-forward"):
        stacked_attention_weights([[AttentionBlock(8, 2, ff_dim=4)] * 2])
    with pytest.raises(ValueError, match="shapes differ"):
        stacked_attention_weights([[AttentionBlock(8, 2), AttentionBlock(8, 4)]])


@pytest.mark.parametrize("weighted", [False, True])
def test_losses_of_several_logits_at_once_equal_them_one_by_one(weighted):
    """focal_losses and mean_symmetric_kl (MiSTER-E's four focal terms and its KL over the expert pairs) against
    focal_loss and symmetric_kl per set of logits and per pair, values and gradients."""
    torch.manual_seed(0)
    logits = torch.randn(3, 6, 3, 5, requires_grad=True)
    labels = torch.randint(0, 5, (3, 6)).masked_fill(~MASK, -100)
    labels[0, 1] = -100  # a real utterance without a label: in the KL, not in the focal losses
    weight = torch.rand(5) + 0.5 if weighted else None

    def value_and_grad(fn):
        logits.grad = None
        value = fn()
        (value * torch.arange(1.0, value.numel() + 1).view_as(value)).sum().backward()
        return value.detach(), logits.grad.clone()

    for got, want in [
        (lambda: focal_losses(logits, labels, 3.0, weight),
         lambda: torch.stack([focal_loss(logits[..., k, :], labels, 3.0, weight) for k in range(3)])),
        (lambda: mean_symmetric_kl(logits, MASK, 2.0),
         lambda: sum(symmetric_kl(logits[..., a, :], logits[..., b, :], MASK, 2.0)
                     for a, b in [(0, 1), (0, 2), (1, 2)]) / 3)]:
        for a, b in zip(value_and_grad(got), value_and_grad(want)):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)

def test_the_training_optimizer_is_fused():
    """AdamW fused (one kernel over all the parameters: 5x faster on CPU for MiSTER-E's 246 small tensors)."""
    from erc.training.config import TrainConfig
    from erc.training.distributed import DDPStepper

    cfg = TrainConfig(dataset="x", prepared="x", inputs={})
    stepper = DDPStepper(cfg, nn.Linear(3, 2), 1, torch.device("cpu"))
    assert stepper.optimizer.defaults["fused"] is True

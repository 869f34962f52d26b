"""Every equation SUMMER (erc/models/summer.py) and MMoLRE (erc/models/mmolre.py, mmolre_context.py) follow, and the
paper's equations of DialogueRNN, MMGCN and the no-context `utterance` model, checked against a value worked out by
hand on a tiny input.

Neither SUMMER nor MMoLRE has code, so their tests are the only check that the code computes what its docstring
says. Each test sets the weights it depends on explicitly (seeded values copied in, identities, zeros), turns dropout
off, and recomputes the equation with plain torch arithmetic: loops, exp, sums; never the module under test or the shared
blocks it calls (top_k_gates, load_balance, kl_distill, ...). The "paper's equation" is the one the model's docstring
states: both papers publish their components, not these formulas, and the docstrings say which forms are erc's.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from erc.data.dialogues import IGNORE, Batch
from erc.models import ModelOutput, ModelSpec, build_model
from erc.models.blocks import LowRankExpert
from erc.models.mmolre import TaskAdaptiveFusion, UniTSEBlock
from erc.models.summer import (
    PairFusion,
    SDMoELayer,
    SparseDynamicMoE,
    SummerConfig,
    TokenPooling,
)

D, HEADS = 4, 2  # model width and heads of every tiny model here
CLASS_WEIGHTS = [1.0, 2.0, 0.5]
SUMMER_SMALL = {"hidden": D, "heads": HEADS, "ff_dim": D, "dropout": 0.0, "num_experts": 3, "top_k": 2,
                "expert_rank": 2, "local_window": 1}


# ---------------------------------------------------------------- helpers: batches, weights, hand arithmetic


def make_batch(features, lengths, *, labels=None, sentiment=None, missing=()) -> Batch:
    """Dialogues of `lengths` utterances padded to T = features' second dim; `missing`: (modality, b, t) absent."""
    B, T = next(iter(features.values())).shape[:2]
    mask = torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]
    modality_mask = {m: mask.clone() for m in features}
    for m, b, t in missing:
        modality_mask[m][b, t] = False
    ignore = torch.full((B, T), IGNORE)
    return Batch(features, modality_mask, mask, torch.arange(T).remainder(2).expand(B, T) * mask,
                 ignore if labels is None else labels, ignore if sentiment is None else sentiment,
                 torch.full((B, T), float("nan")), torch.where(mask, torch.arange(B * T).view(B, T), -1))


def seeded(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def set_(param, value):
    with torch.no_grad():
        param.copy_(value)


def seed_parameters(module, seed):
    """Every parameter of `module` set to known values: seeded normal draws, a different seed per tensor."""
    for k, p in enumerate(module.parameters()):
        set_(p, seeded(*p.shape, seed=seed + k))


def plain_attention(block):
    """Identity q, k, v and output maps, a zero feed-forward: the block is LN(LN(x + attention)), easy by hand."""
    for linear in (block.q, block.k, block.v, block.out):
        set_(linear.weight, torch.eye(D))
        set_(linear.bias, torch.zeros(D))
    for p in block.ff.parameters():
        set_(p, torch.zeros_like(p))


def layer_norm(x, eps=1e-5):
    mean = x.mean(-1, keepdim=True)
    return (x - mean) / ((x - mean).pow(2).mean(-1, keepdim=True) + eps).sqrt()


def softmax(x):
    e = (x - x.max(-1, keepdim=True).values).exp()
    return e / e.sum(-1, keepdim=True)


def top_k_renormalised(probs, k):
    """Keep each row's k largest probabilities, renormalised to sum to one; zeros elsewhere."""
    gates = torch.zeros_like(probs)
    for row in range(probs.shape[0]):
        values = probs[row].tolist()
        kept = sorted(range(len(values)), key=lambda e: -values[e])[:k]
        total = sum(probs[row, e] for e in kept)
        for e in kept:
            gates[row, e] = probs[row, e] / total
    return gates


def hand_attention(query, context, length, bias=None):
    """One dialogue through `plain_attention`: scores q_h.k_h / sqrt(d_h) (+ bias) over the real keys, per head."""
    d_h = D // HEADS
    out = torch.zeros_like(query)
    for i in range(length):
        heads = []
        for h in range(HEADS):
            q, k, v = (t[:length, h * d_h:(h + 1) * d_h] for t in (query[i:i + 1], context, context))
            scores = (q @ k.T).squeeze(0) / math.sqrt(d_h)
            if bias is not None:
                scores = scores + bias[h, i, :length]
            heads.append(softmax(scores) @ v)
        out[i] = layer_norm(layer_norm(query[i] + torch.cat(heads)))
    return out


def hand_expert_bias(x, moe, gates):
    """SDMoE bias of one dialogue x (T, D): sum_e g_ie [(U_e x_i)_h.(V_e x_j)_h / sqrt(r) + b_e[h, clip(i-j)]]."""
    E, H, r, w, T = moe.num_experts, moe.heads, moe.rank, moe.window, x.shape[0]
    U, V = moe.query.weight.view(E, H, r, D), moe.key.weight.view(E, H, r, D)
    bias = torch.zeros(H, T, T)
    for e in range(E):
        for h in range(H):
            for i in range(T):
                for j in range(T):
                    score = (U[e, h] @ x[i]) @ (V[e, h] @ x[j]) / math.sqrt(r)
                    local = moe.relative[e, h, max(-w, min(w, i - j)) + w]
                    bias[h, i, j] += gates[i, e] * (score + local)
    return bias


# ---------------------------------------------------------------- SUMMER: SDMoE


def routed_moe():
    moe = SparseDynamicMoE(D, heads=HEADS, num_experts=3, top_k=2, rank=2, window=1)
    seed_parameters(moe, seed=1)
    return moe


def test_summer_sdmoe_router_gates_match_top_k_softmax():
    """g_i = renormalised top-k of softmax(W_r x_i + b_r): the dynamic router, per query utterance."""
    moe, x = routed_moe(), seeded(1, 3, D, seed=6)
    _, gates, probs = moe(x, torch.ones(1, 3, dtype=torch.bool))
    hand_probs = softmax(x[0] @ moe.router.weight.T + moe.router.bias)
    assert torch.allclose(probs[0], hand_probs, atol=1e-6)
    assert torch.allclose(gates[0], top_k_renormalised(hand_probs, 2), atol=1e-6)


def test_summer_sdmoe_attention_bias_matches_gated_expert_scores():
    """Each expert's low-rank bilinear score plus its clipped relative-position bias (window 1 over 3 utterances, so
    i - j = +-2 share the +-1 bias), weighted by the query utterance's gates."""
    moe, x = routed_moe(), seeded(1, 3, D, seed=6)
    bias, gates, _ = moe(x, torch.ones(1, 3, dtype=torch.bool))
    with torch.no_grad():
        assert torch.allclose(bias[0], hand_expert_bias(x[0], moe, gates[0]), atol=1e-5)


def test_summer_sdmoe_bias_is_added_to_self_attention_scores():
    """softmax(q.k / sqrt(d_h) + bias) over the real utterances: the bias adjusts the intra-modal attention map. Two
    dialogues, the second padded, whose padded row stays zero."""
    layer = SDMoELayer(SummerConfig(**SUMMER_SMALL)).eval()
    layer.moe.load_state_dict(routed_moe().state_dict())
    plain_attention(layer.attention)
    x = seeded(2, 3, D, seed=7)
    x[1, 2] = 0.0
    mask = torch.tensor([[True, True, True], [True, True, False]])
    moe = layer.moe
    with torch.no_grad():
        out, _, _ = layer(x, mask)
        for b, length in enumerate([3, 2]):
            gates = top_k_renormalised(softmax(x[b] @ moe.router.weight.T + moe.router.bias), 2)
            hand = hand_attention(x[b], x[b], length, hand_expert_bias(x[b], moe, gates))
            assert torch.allclose(out[b, :length], hand[:length], atol=1e-5)
        assert not out[1, 2].any()


def hand_switch_balance(probs, k):
    """Switch Transformer E * sum_e f_e P_e over one set of rows: f_e share of top-k slots, P_e mean probability."""
    E = probs.shape[1]
    chosen = (top_k_renormalised(probs, k) > 0).float()
    return E * ((chosen.sum(0) / chosen.sum()) * probs.mean(0)).sum()


def test_summer_balance_term_matches_switch_equation_on_the_embedded_utterances():
    """balance = 0.01 * E * sum_e f_e P_e over real utterances, where the router reads the input layer's
    x_t = W f_t + b + PE(t) + speaker(s_t), PE(t) = [sin t, cos t, sin t/100, cos t/100] at width 4."""
    torch.manual_seed(0)
    model = build_model("summer", ModelSpec({"text": 3}, 3), SUMMER_SMALL).eval()
    for k, module in enumerate([model.inputs["text"], model.speaker, model.sdmoe["text"][0].moe.router]):
        seed_parameters(module, seed=8 + 3 * k)
    moe = model.sdmoe["text"][0].moe
    features = seeded(2, 3, 3, seed=12)
    batch = make_batch({"text": features}, [3, 2])
    with torch.no_grad():
        out = model(batch)
        rows = []
        for b, length in enumerate([3, 2]):
            for t in range(length):
                position = torch.tensor([math.sin(t), math.cos(t), math.sin(t / 100), math.cos(t / 100)])
                x = model.inputs["text"].weight @ features[b, t] + model.inputs["text"].bias + position \
                    + model.speaker.weight[t % 2]
                rows.append(softmax(moe.router.weight @ x + moe.router.bias))
        assert torch.allclose(out.losses["balance"], 0.01 * hand_switch_balance(torch.stack(rows), 2), atol=1e-6)


# ---------------------------------------------------------------- SUMMER: HCMF


def test_summer_hcmf_pair_state_matches_equation():
    """Level 1: z_ab = LayerNorm(ReLU(W_ab [c_a<-b ; c_b<-a] + b_ab)), c_a<-b the cross-attention of a over b."""
    fusion = PairFusion(SummerConfig(**SUMMER_SMALL)).eval()
    plain_attention(fusion.a_from_b)
    plain_attention(fusion.b_from_a)
    seed_parameters(fusion.fuse[0], seed=13)
    a, b = seeded(1, 3, D, seed=15), seeded(1, 3, D, seed=16)
    with torch.no_grad():
        out = fusion(a, b, torch.ones(1, 3, dtype=torch.bool))
        pair = torch.cat([hand_attention(a[0], b[0], 3), hand_attention(b[0], a[0], 3)], dim=-1)
        hand = layer_norm((pair @ fusion.fuse[0].weight.T + fusion.fuse[0].bias).clamp(min=0))
    assert torch.allclose(out[0], hand, atol=1e-5)


def test_summer_hcmf_token_pooling_matches_equation():
    """Level 2: alpha_k = softmax_k(w . tanh(W z_k + b)), fused = sum_k alpha_k z_k over the K = M + P tokens."""
    pooling = TokenPooling(D)
    seed_parameters(pooling, seed=17)
    tokens = seeded(1, 2, 3, D, seed=20)  # 2 utterances, K = 3 tokens (text, audio, text+audio)
    with torch.no_grad():
        fused, weights = pooling(tokens)
        for t in range(2):
            W, b, w = pooling.project.weight, pooling.project.bias, pooling.score.weight[0]
            scores = torch.stack([w @ torch.tanh(W @ z + b) for z in tokens[0, t]])
            alpha = softmax(scores)
            assert torch.allclose(weights[0, t], alpha, atol=1e-6)
            assert torch.allclose(fused[0, t], sum(alpha[k] * tokens[0, t, k] for k in range(3)), atol=1e-6)


# ---------------------------------------------------------------- SUMMER: IKD losses


class FixedTeacher(nn.Module):
    """A stand-in for the frozen text-only teacher: fixed penultimate states and logits; it must see text only."""

    def __init__(self, hidden, logits):
        super().__init__()
        self.register_buffer("hidden", hidden)
        self.register_buffer("logits", logits)

    def forward(self, batch):
        assert set(batch.features) == {"text"}  # the teacher is unimodal
        return ModelOutput(logits=self.logits, extras={"hidden": self.hidden})


# Dialogue 0: 3 utterances, text missing on the second (no IKD there); dialogue 1: 2 utterances, the first unlabelled
# (IKD latent and align terms there, not the smoothing term).
LABELS = torch.tensor([[0, 1, 2], [IGNORE, 1, IGNORE]])
SEEN = torch.tensor([[True, False, True], [True, True, False]])
SMOOTHED = SEEN & (LABELS != IGNORE)


def summer_with_teacher(**overrides):
    torch.manual_seed(0)
    spec = ModelSpec({"text": 3, "audio": 2}, 3, class_weights=CLASS_WEIGHTS)
    model = build_model("summer", spec, {**SUMMER_SMALL, **overrides})
    model.teacher = FixedTeacher(seeded(2, 3, 3, seed=21), 2.0 * seeded(2, 3, 3, seed=22))
    model.to_teacher = nn.Linear(D, 3)  # P: student width -> teacher width 3
    seed_parameters(model.to_teacher, seed=23)
    batch = make_batch({"text": seeded(2, 3, 3, seed=25), "audio": seeded(2, 3, 2, seed=26)}, [3, 2], labels=LABELS,
                       missing=[("text", 0, 1)])
    with torch.no_grad():
        return model.eval(), model.eval()(batch)


@pytest.mark.parametrize("latent_loss", ["cosine", "mse"])
def test_summer_ikd_cross_term_matches_equation(latent_loss):
    """kappa1 * mean over IKD utterances of 1 - cos(P s, h_t) (or, with latent_loss mse, mean_d (P s - h_t)^2)."""
    model, out = summer_with_teacher(kappa_cross=0.5, latent_loss=latent_loss)
    s, h_t = out.extras["hidden"][SEEN], model.teacher.hidden[SEEN]
    projected = s @ model.to_teacher.weight.T + model.to_teacher.bias
    if latent_loss == "cosine":
        per_utterance = 1 - (projected * h_t).sum(-1) / (projected.norm(dim=-1) * h_t.norm(dim=-1))
    else:
        per_utterance = ((projected - h_t) ** 2).mean(-1)
    assert torch.allclose(out.losses["kd_cross"], 0.5 * per_utterance.mean(), atol=1e-6)


@pytest.mark.parametrize("temperature, t_squared", [(2.0, True), (1.0, True), (3.5, False)],
                         ids=["T=2", "T=1", "T=3.5-no-T^2"])
def test_summer_ikd_alignment_term_matches_equation(temperature, t_squared):
    """kappa2 * T^2 * mean_i KL(softmax(z_t/T) || softmax(z_s/T)) over the IKD utterances; the temperature softens
    both distributions and T^2 (Hinton et al.) can be switched off."""
    model, out = summer_with_teacher(kappa_align=0.7, temperature=temperature, t_squared=t_squared)
    p_teacher = softmax(model.teacher.logits[SEEN] / temperature)
    p_student = softmax(out.logits[SEEN] / temperature)
    kl = (p_teacher * (p_teacher.log() - p_student.log())).sum(-1).mean()
    hand = 0.7 * kl * (temperature ** 2 if t_squared else 1.0)
    assert torch.allclose(out.losses["align"], hand, atol=1e-6)


@pytest.mark.parametrize("temperature, eps", [(2.0, 0.1), (0.5, 0.4)])
def test_summer_ikd_smoothing_term_matches_equation(temperature, eps):
    """kappa3 * CE against (1 - eps) onehot(y) + eps softmax(z_t / T), a class-weighted mean like the CE term
    (erc's documented reading of L_smooth^Label), over labelled IKD utterances."""
    model, out = summer_with_teacher(kappa_smooth=0.3, temperature=temperature, smooth_mix=eps)
    y = LABELS[SMOOTHED]
    target = (1 - eps) * torch.eye(3)[y] + eps * softmax(model.teacher.logits[SMOOTHED] / temperature)
    per_utterance = -(target * softmax(out.logits[SMOOTHED]).log()).sum(-1)
    w = torch.tensor(CLASS_WEIGHTS)[y]
    assert torch.allclose(out.losses["smooth"], 0.3 * (w * per_utterance).sum() / w.sum(), atol=1e-6)


def test_summer_student_loss_is_ce_plus_kappa_weighted_ikd_terms():
    """L = CE + kappa1 L_cross + kappa2 L_align + kappa3 L_smooth (+ erc's router balance): CE is the class-weighted
    mean of -log p_y over every labelled utterance, text or not."""
    _, out = summer_with_teacher()
    labelled = LABELS != IGNORE
    y = LABELS[labelled]
    w = torch.tensor(CLASS_WEIGHTS)[y]
    nll = -softmax(out.logits[labelled]).log()[torch.arange(len(y)), y]
    assert torch.allclose(out.losses["ce"], (w * nll).sum() / w.sum(), atol=1e-6)
    assert set(out.losses) == {"ce", "balance", "kd_cross", "align", "smooth"}
    assert torch.allclose(out.loss, sum(out.losses[k] for k in ("ce", "kd_cross", "align", "smooth", "balance")))


# ---------------------------------------------------------------- MMoLRE


def hand_low_rank_expert(expert, x, present):
    """Conv1d k=3 (d -> r) over the utterances, GELU, Conv1d k=1 (r -> d); an absent utterance counts as padding
    (erc's documented departure: the paper convolves over an utterance's tokens)."""
    W, b = expert.down.weight, expert.down.bias  # (r, d, 3), (r,)
    T = x.shape[0]
    x = x * present[:, None]
    padded = torch.cat([torch.zeros(1, x.shape[1]), x, torch.zeros(1, x.shape[1])])
    down = torch.stack([sum(W[:, :, k] @ padded[t + k] for k in range(3)) + b for t in range(T)]) * present[:, None]
    gelu = 0.5 * down * (1 + torch.erf(down / math.sqrt(2)))
    return (gelu @ expert.up.weight[:, :, 0].T + expert.up.bias) * present[:, None]


def test_mmolre_low_rank_expert_matches_equation():
    """f(x) = W_up GELU(W_down * x): a kernel-3 bottleneck to rank r and back, zero at an absent utterance."""
    expert = LowRankExpert(3, 2)
    seed_parameters(expert, seed=30)
    x = seeded(1, 4, 3, seed=34)
    present = torch.tensor([[True, False, True, True]])  # the second utterance lacks this modality
    with torch.no_grad():
        assert torch.allclose(expert(x, present)[0], hand_low_rank_expert(expert, x[0], present[0].float()), atol=1e-5)


def unitse_block():
    """One block, 2 shared experts, the two tasks, top-2 of 3; the tasks' streams differ (as in block 2)."""
    block = UniTSEBlock(3, 2, 2, ["emotion", "sentiment"], top_k=2, dropout=0.0)
    seed_parameters(block, seed=40)  # experts, routers and LayerNorms alike
    streams = {"emotion": seeded(1, 3, 3, seed=94), "sentiment": seeded(1, 3, 3, seed=95)}
    present = torch.tensor([[True, True, False]])
    with torch.no_grad():
        return block, streams, present, block(streams, present)


def test_mmolre_task_router_gates_match_top_k_softmax():
    """g^tau = renormalised top-k of softmax(W_tau h + b_tau) over N shared + 1 task-specific experts, zero where
    the modality is absent; the block's balance term is E * sum_e f_e P_e over the present utterances."""
    block, streams, _, (_, gates, balance) = unitse_block()
    for task, x in streams.items():
        probs = softmax(x[0, :2] @ block.router[task].weight.T + block.router[task].bias)
        assert torch.allclose(gates[task][0, :2], top_k_renormalised(probs, 2), atol=1e-6)
        assert not gates[task][0, 2].any()
        assert torch.allclose(balance[task], hand_switch_balance(probs, 2), atol=1e-6)


def test_mmolre_unitse_mixture_of_low_rank_experts_matches_equation():
    """h^tau <- LayerNorm(h^tau + sum_e g_e f_e(h^tau)) with its gain and shift, f over the N shared experts and
    tau's own one; the shared experts run on each task's own stream (the residual + LayerNorm are erc's, documented)."""
    block, streams, present, (new, gates, _) = unitse_block()
    p = present[0].float()
    for task, x in streams.items():
        with torch.no_grad():
            experts = [hand_low_rank_expert(e, x[0], p) for e in [*block.shared, block.specific[task]]]
        mixed = sum(gates[task][0, :, e:e + 1] * experts[e] for e in range(3))
        norm = block.norm[task]
        hand = (layer_norm(x[0] + mixed) * norm.weight + norm.bias) * p[:, None]
        assert torch.allclose(new[task][0], hand, atol=1e-5)


def test_mmolre_task_adaptive_fusion_matches_equation():
    """a_m = softmax over the present modalities of w . tanh(W h_m + b); fused = sum_m a_m h_m (no modality: 0)."""
    fusion = TaskAdaptiveFusion(3)
    seed_parameters(fusion, seed=100)
    states = seeded(1, 3, 2, 3, seed=103)  # 3 utterances, 2 modalities
    present = torch.tensor([[[True, True], [True, False], [False, False]]])
    with torch.no_grad():
        fused, weights = fusion(states, present)
        for t in range(3):
            kept = [m for m in range(2) if present[0, t, m]]
            hand_fused, hand_weights = torch.zeros(3), torch.zeros(2)
            if kept:
                scores = torch.stack([fusion.score[2].weight[0] @ torch.tanh(
                    fusion.score[0].weight @ states[0, t, m] + fusion.score[0].bias) for m in kept])
                hand_weights[kept] = softmax(scores)
                hand_fused = sum(hand_weights[m] * states[0, t, m] for m in kept)
            assert torch.allclose(weights[0, t], hand_weights, atol=1e-6)
            assert torch.allclose(fused[0, t], hand_fused, atol=1e-6)


def hand_ce(logits, labels, class_weights=None):
    keep = labels != IGNORE
    y = labels[keep]
    nll = -softmax(logits[keep]).log()[torch.arange(len(y)), y]
    w = torch.ones(len(y)) if class_weights is None else torch.tensor(class_weights)[y]
    return (w * nll).sum() / w.sum()


def test_mmolre_two_task_losses_match_weighted_cross_entropies():
    """ce_emotion = emotion_weight * class-weighted CE, ce_sentiment = sentiment_weight * plain CE (the auxiliary
    task is unweighted, as documented); the loss is their sum (balance off here)."""
    torch.manual_seed(0)
    spec = ModelSpec({"text": 3, "audio": 2}, 3, num_sentiment_classes=3, class_weights=CLASS_WEIGHTS)
    model = build_model("mmolre", spec, {"hidden": D, "rank": 2, "num_shared": 2, "top_k": 2, "dropout": 0.0,
                                         "emotion_weight": 0.6, "sentiment_weight": 1.7, "balance_weight": 0.0}).eval()
    sentiment = torch.tensor([[2, 0, 1], [1, IGNORE, IGNORE]])
    batch = make_batch({"text": seeded(2, 3, 3, seed=110), "audio": seeded(2, 3, 2, seed=111)}, [3, 2],
                       labels=LABELS, sentiment=sentiment, missing=[("audio", 0, 1)])
    with torch.no_grad():
        out = model(batch)
    assert torch.allclose(out.losses["ce_emotion"], 0.6 * hand_ce(out.logits, LABELS, CLASS_WEIGHTS), atol=1e-6)
    assert torch.allclose(out.losses["ce_sentiment"], 1.7 * hand_ce(out.sentiment_logits, sentiment), atol=1e-6)
    assert set(out.losses) == {"ce_emotion", "ce_sentiment"}
    assert torch.allclose(out.loss, out.losses["ce_emotion"] + out.losses["ce_sentiment"])


def hand_gru(gru_weights, xs, reverse):
    """PyTorch's GRU cell (gates r, z, n) over the rows of xs, from h = 0; reverse runs from the last row back."""
    w_ih, w_hh, b_ih, b_hh = gru_weights
    h, out = torch.zeros(w_hh.shape[1]), [None] * len(xs)
    for t in (reversed(range(len(xs))) if reverse else range(len(xs))):
        gi, gh = w_ih @ xs[t] + b_ih, w_hh @ h + b_hh
        (ir, iz, i_n), (hr, hz, hn) = gi.chunk(3), gh.chunk(3)
        r, z = torch.sigmoid(ir + hr), torch.sigmoid(iz + hz)
        h = (1 - z) * torch.tanh(i_n + r * hn) + z * h
        out[t] = h
    return torch.stack(out)


def test_mmolre_context_gru_adds_dialogue_context_residually():
    """mmolre_context (documented departure): x <- (x + BiGRU(x)) * present after x = LayerNorm(W f + b) * present; the
    GRU runs over every real utterance of the dialogue (an absent one as a zero input) and stops at its end. With no
    UniTSE block and one modality, the fused state is exactly that x."""
    torch.manual_seed(0)
    model = build_model("mmolre_context", ModelSpec({"text": 3}, 3), {"hidden": D, "rank": 2, "num_shared": 2,
                                                                      "dropout": 0.0, "num_blocks": 0}).eval()
    projection, gru = model.project["text"][0], model.context["text"].gru
    seed_parameters(projection, seed=120)
    seed_parameters(gru, seed=130)
    features = seeded(2, 3, 3, seed=122)
    batch = make_batch({"text": features}, [3, 2], missing=[("text", 0, 1)])
    with torch.no_grad():
        hidden = model(batch).extras["hidden"]
        for b, length in enumerate([3, 2]):
            present = batch.modality_mask["text"][b, :length].float()[:, None]
            x = layer_norm(features[b, :length] @ projection.weight.T + projection.bias) * present
            names = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
            forward, backward = (hand_gru([getattr(gru, f"{n}_l0{direction}") for n in names], x, bool(direction))
                                 for direction in ("", "_reverse"))
            hand = (x + torch.cat([forward, backward], dim=-1)) * present
            assert torch.allclose(hidden[b, :length], hand, atol=1e-5)
            assert not hidden[b, length:].any()


# ---------------------------------------------------------------- MMGCN (erc/models/mmgcn.py)
# MMGCN has official code; these check the two equations its docstring takes from the paper and that code: the
# normalised multimodal adjacency and one GCNII* layer, recomputed with loops and math.acos.


def mmgcn_tiny_graph():
    """One dialogue of 3 utterances padded to 4, text and audio, the second utterance without audio; the model's
    node features and adjacency (dropout off)."""
    torch.manual_seed(0)
    model = build_model("mmgcn", ModelSpec({"text": 3, "audio": 2}, 3),
                        {"hidden": D, "gcn_hidden": 3, "layers": 2, "dropout": 0.0}).eval()
    batch = make_batch({"text": seeded(1, 4, 3, seed=140), "audio": seeded(1, 4, 2, seed=141)}, [3],
                       missing=[("audio", 0, 1)])
    with torch.no_grad():
        nodes, valid, adj = model.graph(batch)
    return model, batch, nodes, valid, adj


def test_mmgcn_adjacency_is_normalised_angular_similarity_over_the_real_nodes():
    """A_ij = 1 - arccos(0.99999 cos(x_i, x_j)) / pi between two nodes of one modality (i = j included: the
    self-loop) or the two modality nodes of one utterance, 0 otherwise and at any padded or missing node;
    the module's adjacency is D^-1/2 A D^-1/2 with D the row sums, nodes in the order m*T + t (audio, text)."""
    model, batch, nodes, valid, adj = mmgcn_tiny_graph()
    assert model.modalities == ["audio", "text"]
    M, T = 2, 4
    exists = [[bool(batch.mask[0, t] and batch.modality_mask[m][0, t]) for t in range(T)] for m in model.modalities]
    assert exists == [[True, False, True, False], [True, True, True, False]]
    assert valid[0].tolist() == exists

    def angular(a, b):
        cos = float(a @ b) / math.sqrt(float(a @ a) * float(b @ b))
        return 1 - math.acos(0.99999 * cos) / math.pi

    A = torch.zeros(M * T, M * T)
    for m in range(M):
        for t in range(T):
            for n in range(M):
                for s in range(T):
                    if exists[m][t] and exists[n][s] and (m == n or t == s):
                        A[m * T + t, n * T + s] = angular(nodes[0, m, t], nodes[0, n, s])
    degree = A.sum(1)
    hand = torch.zeros_like(A)
    for i in range(M * T):
        for j in range(M * T):
            if A[i, j] != 0:
                hand[i, j] = A[i, j] / math.sqrt(degree[i] * degree[j])
    assert A[0, 0] > 0.99 and A[4 + 1, 4 + 1] > 0.99 and A[1].abs().sum() == 0  # self-loops; the missing node
    assert A[0, 4] != 0 and A[0, 5] == 0 and A[4, 5] != 0  # inter-modal only within an utterance
    torch.testing.assert_close(adj[0], hand, atol=1e-6, rtol=1e-5)


def test_mmgcn_gcnii_layer_matches_equation():
    """Layer l (before its ReLU): beta_l [A h, h0] W_l + (1 - beta_l)((1 - alpha) A h + alpha h0), with
    beta_l = log(lamda / l + 1); the model's second layer (l = 2) on the tiny graph's adjacency."""
    model, _, _, _, adj = mmgcn_tiny_graph()
    layer = model.gcn[1]
    alpha, lamda = model.config.alpha, model.config.lamda
    assert layer.beta == pytest.approx(math.log(lamda / 2 + 1))
    seed_parameters(layer, seed=150)
    h, h0 = seeded(1, 8, 3, seed=151), seeded(1, 8, 3, seed=152)
    W = layer.weight.weight  # (3, 6): output units x [A h, h0]
    beta = math.log(lamda / 2 + 1)
    hand = torch.zeros(8, 3)
    for i in range(8):
        propagated = sum(adj[0, i, j] * h[0, j] for j in range(8))
        support = torch.cat([propagated, h0[0, i]])
        for k in range(3):
            hand[i, k] = beta * sum(W[k, c] * support[c] for c in range(6)) \
                + (1 - beta) * ((1 - alpha) * propagated[k] + alpha * h0[0, i, k])
    with torch.no_grad():
        torch.testing.assert_close(layer(h, adj, h0)[0], hand, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- DialogueRNN and the no-context utterance baseline


def hand_gru_cell(cell, x, h):
    """PyTorch's GRUCell (gates r, z, n) from the cell's weights: h' = (1 - z) n + z h."""
    gi, gh = cell.weight_ih @ x + cell.bias_ih, cell.weight_hh @ h + cell.bias_hh
    (ir, iz, i_n), (hr, hz, hn) = gi.chunk(3), gh.chunk(3)
    r, z = torch.sigmoid(ir + hr), torch.sigmoid(iz + hz)
    return (1 - z) * torch.tanh(i_n + r * hn) + z * h


def hand_dialoguernn(cells, u, speakers, listener):
    """One direction of DialogueRNN over one dialogue u (T, D), speakers (T,), an utterance at a time:
    g_t = GRU_G(g_{t-1}, u_t + q_s), c_t = softmax(u_t^T W_a [g_1..g_{t-1}]) [g_1..g_{t-1}],
    q_s = GRU_P(q_s, u_t + c_t), listeners q_l = GRU_L(q_l, u_t + q_s) when `listener`, e_t = GRU_E(e_{t-1}, q_s);
    '+' is concatenation here."""
    D_g, D_p, D_e = cells.global_gru.hidden_size, cells.party_gru.hidden_size, cells.emotion_gru.hidden_size
    g, e, history, out = torch.zeros(D_g), torch.zeros(D_e), [], []
    party = {int(s): torch.zeros(D_p) for s in speakers}
    for t in range(len(u)):
        s = int(speakers[t])
        g = hand_gru_cell(cells.global_gru, torch.cat([u[t], party[s]]), g)
        context = torch.zeros(D_g)
        if history:
            query = cells.attention.weight @ u[t]
            alpha = softmax(torch.stack([query @ g_j for g_j in history]))
            context = sum(a * g_j for a, g_j in zip(alpha, history))
        history.append(g)
        spoken = hand_gru_cell(cells.party_gru, torch.cat([u[t], context]), party[s])
        if listener:
            for other in party:
                if other != s:
                    party[other] = hand_gru_cell(cells.listener_gru, torch.cat([u[t], spoken]), party[other])
        party[s] = spoken
        e = hand_gru_cell(cells.emotion_gru, spoken, e)
        out.append(e)
    return torch.stack(out)


DRNN_SMALL = {"global_size": 4, "party_size": 3, "emotion_size": 3, "hidden": 4, "dropout": 0.0, "rec_dropout": 0.0,
              "emotion_dropout": 0.0}
# Dialogue 0: speakers A B B A (A's state comes back after two turns of B), audio missing on its third utterance;
# dialogue 1: three speakers, padded by one.
DRNN_SPEAKERS = torch.tensor([[0, 1, 1, 0], [0, 1, 2, 0]])
DRNN_LENGTHS = [4, 3]


def dialoguernn_and_batch(**overrides):
    torch.manual_seed(0)
    model = build_model("dialoguernn", ModelSpec({"text": 3, "audio": 2}, 3), {**DRNN_SMALL, **overrides}).eval()
    for k, p in enumerate(model.parameters()):  # seeded, halved so that the gates do not saturate
        set_(p, 0.5 * seeded(*p.shape, seed=140 + k))
    batch = make_batch({"text": seeded(2, 4, 3, seed=150), "audio": seeded(2, 4, 2, seed=151)}, DRNN_LENGTHS,
                       missing=[("audio", 0, 2)])
    batch.speakers = DRNN_SPEAKERS * batch.mask
    u = torch.cat([batch.features[m] * batch.modality_mask[m][..., None] for m in ("audio", "text")], dim=-1)
    return model, batch, u


def hand_head(model, x):
    """Linear -> ReLU -> classifier on the rows of x."""
    hidden = torch.relu(x @ model.linear.weight.T + model.linear.bias)
    return hidden @ model.classifier.weight.T + model.classifier.bias


@pytest.mark.parametrize("listener", [False, True])
def test_dialoguernn_recurrence_matches_the_papers_equations(listener):
    """Unidirectional, no emotion attention: every emotion state e_t (global state, attention context over the
    global history, the speaker's party update, listeners' when `listener_state`, emotion GRU) and the logits."""
    model, batch, u = dialoguernn_and_batch(bidirectional=False, emotion_attention=False, listener_state=listener)
    with torch.no_grad():
        out = model(batch)
        for b, length in enumerate(DRNN_LENGTHS):
            e = hand_dialoguernn(model.directions[0], u[b, :length], DRNN_SPEAKERS[b, :length], listener)
            assert torch.allclose(out.extras["emotions"][b, :length], e, atol=1e-5)
            assert torch.allclose(out.logits[b, :length], hand_head(model, e), atol=1e-5)


def test_bidialoguernn_with_emotion_attention_matches_the_papers_equations():
    """BiDialogueRNN+Att: the reverse direction is its own DialogueRNN over the dialogue reversed; e_t is both
    directions' states concatenated; beta_t = softmax((W_b e_t + b) . e_j) over the dialogue's real utterances, the
    head reads sum_j beta_tj e_j."""
    model, batch, u = dialoguernn_and_batch()
    with torch.no_grad():
        out = model(batch)
        for b, length in enumerate(DRNN_LENGTHS):
            x, speakers = u[b, :length], DRNN_SPEAKERS[b, :length]
            forward = hand_dialoguernn(model.directions[0], x, speakers, False)
            backward = hand_dialoguernn(model.directions[1], x.flip(0), speakers.flip(0), False).flip(0)
            e = torch.cat([forward, backward], dim=-1)
            W, bias = model.emotion_attention.weight, model.emotion_attention.bias
            beta = torch.stack([softmax(torch.stack([(W @ e[t] + bias) @ e[j] for j in range(length)]))
                                for t in range(length)])
            assert torch.allclose(out.extras["emotions"][b, :length], e, atol=1e-5)
            assert torch.allclose(out.extras["emotion_attention"][b, :length, :length], beta, atol=1e-5)
            assert not out.extras["emotion_attention"][b, :, length:].any()
            assert torch.allclose(out.logits[b, :length], hand_head(model, beta @ e), atol=1e-5)


def test_utterance_baseline_output_depends_on_the_utterance_alone():
    """logits_t = C relu(W [relu(P_audio a_t + p_audio), relu(P_text x_t + p_text)] + w) + c, from the utterance's own
    features only: changing every other utterance of the dialogue (and the speakers) leaves it as it is, and so
    does running it as a dialogue of its own; the context baseline's output at the same place does change."""
    spec = ModelSpec({"text": 3, "audio": 2}, 3)
    torch.manual_seed(0)
    model = build_model("utterance", spec, {"hidden": 2, "dropout": 0.0}).eval()
    context = build_model("baseline", spec, {"hidden": 2, "dropout": 0.0}).eval()
    seed_parameters(model, seed=170)
    seed_parameters(context, seed=180)
    features = {"text": seeded(1, 4, 3, seed=160), "audio": seeded(1, 4, 2, seed=161)}
    batch = make_batch(features, [4])
    others = make_batch({m: torch.where(torch.arange(4)[None, :, None] == 2, f, f + 3.0 * seeded(*f.shape, seed=162))
                         for m, f in features.items()}, [4])
    others.speakers = torch.tensor([[1, 0, 0, 1]])
    alone = make_batch({m: f[:, 2:3] for m, f in features.items()}, [1])
    with torch.no_grad():
        out = model(batch).logits[0, 2]
        assert torch.allclose(model(others).logits[0, 2], out, atol=1e-6)
        assert torch.allclose(model(alone).logits[0, 0], out, atol=1e-6)
        assert not torch.allclose(context(others).logits[0, 2], context(batch).logits[0, 2], atol=1e-3)
        projected = [torch.relu(model.encoders[m].proj[0].weight @ features[m][0, 2] + model.encoders[m].proj[0].bias)
                     for m in ("audio", "text")]
        trunk = model.trunk[1]
        hidden = torch.relu(trunk.weight @ torch.cat(projected) + trunk.bias)
        assert torch.allclose(out, model.classifier.weight @ hidden + model.classifier.bias, atol=1e-6)

"""Every equation SUMMER (erc/models/summer.py) and MMoLRE (erc/models/mmolre.py, mmolre_context.py) follow, checked
against a value worked out by hand on a tiny input.

Neither paper has code, so these tests are the only check that the code computes what its docstring says. Each test
sets the weights it depends on explicitly (seeded values copied in, identities, zeros), turns dropout off, and
recomputes the equation with plain torch arithmetic: loops, exp, sums; never the module under test or the shared
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

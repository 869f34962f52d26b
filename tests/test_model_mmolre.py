"""MMoLRE (multimodal mixture of low-rank experts) on tiny generated dialogues (no Ray).

Three kinds of data: emotion only (IEMOCAP-like), emotion + sentiment labels (MELD-like, two tasks),
binary sentiment + score (MOSI-like, the sentiment task alone with a regression head).
"""

import dataclasses

import pytest
import torch

from erc.data.dialogues import IGNORE, Batch
from erc.models import MODELS, ModelSpec, build_model
from erc.models.blocks import LowRankExpert, load_balance, top_k_gates
from erc.models.mmolre import parameter_counts
from tests.fixtures import (alone_and_padded, make_prepared, missing_audio_batch, one_torch_thread, overfit, pad,
                            shortest_and_longest, task_of)

SMALL = {"hidden": 32, "rank": 8, "num_shared": 3, "top_k": 2, "dropout": 0.1}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These tensors are tiny: one thread is ~60x faster than two fighting over a busy 2-core machine."""
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def tasks(tiny_emotion, tiny_mosi, tmp_path_factory):
    meld = make_prepared(tmp_path_factory.mktemp("tiny") / "meld", kind="meld")
    return {"emotion": task_of(tiny_emotion), "mosi": task_of(tiny_mosi), "meld": task_of(meld)}


def model_for(spec, seed=0, **overrides):
    torch.manual_seed(seed)
    return build_model("mmolre", spec, {**SMALL, **overrides})


def with_modalities(spec, modalities, dims=None):
    dims = dims or {}
    return dataclasses.replace(spec, input_dims={m: dims.get(m) or spec.input_dims[m] for m in modalities})

# ---------------------------------------------------------------- configuration and tasks


def test_registered_with_paper_defaults():
    config = MODELS["mmolre"].Config()
    assert config.hidden == 768 and config.num_blocks == 2  # the paper's d and UniTSE depth
    assert config.top_k <= config.num_shared + 1
    spec = ModelSpec(input_dims={"text": 4}, num_classes=2)
    with pytest.raises(ValueError, match="top_k"):
        build_model("mmolre", spec, {**SMALL, "top_k": SMALL["num_shared"] + 2})


def test_tasks_follow_the_data(tasks):
    emotion, mosi, meld = (model_for(tasks[k].spec) for k in ("emotion", "mosi", "meld"))
    assert emotion.tasks == ["emotion"] and emotion.score_head is None
    assert mosi.tasks == ["sentiment"] and mosi.score_head is not None
    assert meld.tasks == ["emotion", "sentiment"] and meld.score_head is None
    assert meld.heads["emotion"].out_features == 3 and meld.heads["sentiment"].out_features == 3
    assert mosi.heads["sentiment"].out_features == 2


# ---------------------------------------------------------------- shapes


@pytest.mark.parametrize("kind", ["emotion", "mosi", "meld"])
@pytest.mark.parametrize("modalities", [("text",), ("audio",), ("text", "audio")])
def test_output_shapes(tasks, kind, modalities):
    task = tasks[kind]
    model = model_for(with_modalities(task.spec, modalities)).eval()
    batch = task.splits["train"].collate([0, 1, 2])
    B, T = batch.mask.shape
    with torch.no_grad():
        out = model(batch)
    assert out.logits.shape == (B, T, task.spec.num_classes)
    assert (out.score is not None) == (kind == "mosi")
    if kind == "mosi":
        assert out.score.shape == (B, T)
    assert (out.sentiment_logits is not None) == (kind == "meld")
    if kind == "meld":
        assert out.sentiment_logits.shape == (B, T, 3)
    expected = {"emotion": {"ce_emotion", "balance"}, "mosi": {"ce_sentiment", "score_l1", "balance"},
                "meld": {"ce_emotion", "ce_sentiment", "balance"}}[kind]
    assert set(out.losses) == expected
    assert all(torch.isfinite(v) for v in out.losses.values())
    # router gates: (B, T, N+1), exactly k non-zeros summing to 1 at real positions, zero at padding
    E = SMALL["num_shared"] + 1
    for m in modalities:
        for t in model.tasks:
            for i in range(2):
                g = out.extras[f"gates_{m}_{t}_{i}"]
                real = batch.modality_mask[m]
                assert g.shape == (B, T, E)
                assert ((g > 0).sum(-1)[real] == SMALL["top_k"]).all()
                torch.testing.assert_close(g.sum(-1)[real], torch.ones(int(real.sum())))
                assert (g[~batch.mask] == 0).all()
    # fusion weights sum to 1 where some modality is present, 0 where none is (the utterance without audio)
    any_present = torch.stack([batch.modality_mask[m] for m in modalities], -1).any(-1)
    for t in model.tasks:
        w = out.extras[f"fusion_{t}"]
        assert w.shape == (B, T, len(modalities))
        torch.testing.assert_close(w.sum(-1), any_present.float())


def test_video_is_a_modality_like_any_other(tasks):
    """Three modalities, one of them video with its own dim: shapes hold and video changes the output."""
    task = tasks["meld"]
    spec = with_modalities(task.spec, ("text", "audio", "video"), {"video": 5})
    model = model_for(spec).eval()
    assert sorted(model.unitse) == ["audio", "text", "video"]
    batch = task.splits["train"].collate([0, 1])
    batch.features["video"] = torch.randn(*batch.mask.shape, 5) * batch.mask.unsqueeze(-1)
    batch.modality_mask["video"] = batch.mask.clone()
    with torch.no_grad():
        out = model(batch)
        assert out.extras["fusion_emotion"].shape == (*batch.mask.shape, 3)
        batch.features["video"] = batch.features["video"] + 1.0
        changed = model(batch)
    assert (changed.logits - out.logits)[batch.mask].abs().max() > 1e-4


@pytest.mark.parametrize("modalities", [("text",), ("audio",), ("text", "audio")])
def test_a_modality_matters_if_and_only_if_used(tasks, modalities):
    task = tasks["emotion"]
    model = model_for(with_modalities(task.spec, modalities)).eval()
    assert sorted(model.unitse) == sorted(modalities)
    data = task.splits["train"]
    with torch.no_grad():
        base = model(data.collate([0, 1, 2, 3])).logits
        for m in ("text", "audio"):
            changed = data.collate([0, 1, 2, 3])
            changed.features[m] = changed.features[m] + 1.0
            delta = (model(changed).logits - base)[changed.mask].abs().max().item()
            assert (delta > 1e-4) if m in modalities else (delta == 0.0), m


def test_missing_modality_rows_are_masked(tasks):
    """The utterance without audio: its audio values do not matter and fusion gives audio no weight there."""
    data = tasks["emotion"].splits["train"]
    batch, pos = missing_audio_batch(data)
    assert not batch.modality_mask["audio"][0, pos]
    model = model_for(tasks["emotion"].spec).eval()
    with torch.no_grad():
        before = model(batch)
        batch.features["audio"][0, pos] = 100.0
        after = model(batch)
    torch.testing.assert_close(after.logits, before.logits)
    audio = model.modalities.index("audio")
    assert before.extras["fusion_emotion"][0, pos, audio] == 0.0
    assert (before.extras["gates_audio_emotion_0"][0, pos] == 0).all()


# ---------------------------------------------------------------- padding


@pytest.mark.parametrize("kind", ["emotion", "mosi", "meld"])
def test_padding_invariance(tasks, kind):
    task = tasks[kind]
    data = task.splits["train"]
    short, long, n = shortest_and_longest(data)
    model = model_for(task.spec).eval()
    alone, batch, together = alone_and_padded(model, data.collate, short, long, n)
    torch.testing.assert_close(together.logits[1, :n], alone.logits[0, :n], atol=1e-5, rtol=0)
    if kind == "mosi":
        torch.testing.assert_close(together.score[1, :n], alone.score[0, :n], atol=1e-5, rtol=0)
    if kind == "meld":
        torch.testing.assert_close(together.sentiment_logits[1, :n], alone.sentiment_logits[0, :n], atol=1e-5, rtol=0)
    for key, gate in alone.extras.items():
        if key.startswith("gates_") or key.startswith("fusion_"):
            torch.testing.assert_close(together.extras[key][1, :n], gate[0, :n], atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["mosi", "meld"])
def test_loss_terms_ignore_extra_padding(tasks, kind):
    """Every named loss term (balance included) is the same when the batch carries 5 more padded positions."""
    task = tasks[kind]
    model = model_for(task.spec).eval()
    batch = task.splits["train"].collate([0, 1, 2])
    with torch.no_grad():
        plain, more = model(batch).losses, model(pad(batch, 5, junk=7.0)).losses
    assert set(plain) == set(more) and len(plain) >= 3
    for key in plain:
        torch.testing.assert_close(more[key], plain[key], atol=1e-6, rtol=1e-6, msg=key)


# ---------------------------------------------------------------- routing


def test_top_k_gates_and_load_balance():
    logits = torch.tensor([[[2.0, 1.0, 0.0, -1.0], [0.0, 0.0, 3.0, 1.0]]])  # (1, 2, 4)
    gates, probs = top_k_gates(logits, 2)
    torch.testing.assert_close(probs, logits.softmax(-1))
    p = probs[0, 0]
    torch.testing.assert_close(gates[0, 0], torch.stack([p[0], p[1], p.new_zeros(()), p.new_zeros(())]) / (p[0] + p[1]))
    assert (gates[0, 1, [0, 1]] == 0).all() and (gates[0, 1, [2, 3]] > 0).all()
    mask = torch.ones(1, 2, dtype=torch.bool)
    uniform = torch.zeros(1, 2, 4)
    g, pr = top_k_gates(uniform, 4)
    torch.testing.assert_close(load_balance(pr, g, mask), torch.tensor(1.0))
    collapsed = torch.tensor([[[9.0, 8.0, 0.0, 0.0], [9.0, 8.0, 0.0, 0.0]]])
    g, pr = top_k_gates(collapsed, 2)
    assert load_balance(pr, g, mask) > 1.5
    # a padded position does not count
    half = torch.tensor([[True, False]])
    g, pr = top_k_gates(torch.cat([collapsed[:, :1], uniform[:, :1]], 1), 2)
    g1, pr1 = top_k_gates(collapsed[:, :1], 2)
    torch.testing.assert_close(load_balance(pr, g, half), load_balance(pr1, g1, torch.ones(1, 1, dtype=torch.bool)))


def test_no_balance_term_when_its_weight_is_zero(tasks):
    model = model_for(tasks["emotion"].spec, balance_weight=0.0).eval()
    with torch.no_grad():
        out = model(tasks["emotion"].splits["train"].collate([0, 1]))
    assert set(out.losses) == {"ce_emotion"}


# ---------------------------------------------------------------- losses and gradients


def grads_of(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward(retain_graph=True)
    return {n: p.grad is not None and bool(p.grad.abs().sum() > 0) for n, p in model.named_parameters()}


def test_every_parameter_gets_gradient_and_each_term_only_where_it_should(tasks):
    task = tasks["meld"]
    # all N+1 experts kept, so that every expert is on the path of the loss in one batch
    model = model_for(task.spec, top_k=SMALL["num_shared"] + 1).train()
    out = model(task.splits["train"].collate(range(len(task.splits["train"]))))
    assert set(out.losses) == {"ce_emotion", "ce_sentiment", "balance"}
    assert all(torch.isfinite(v) for v in out.losses.values())

    total = grads_of(model, out.loss)
    for name, p in model.named_parameters():
        assert total[name], name
        assert torch.isfinite(p.grad).all(), name

    def mine(name, task_name):  # one task's own parameters: its experts, routers, norms, fusion and head
        return f".{task_name}." in f".{name}."

    for term, own, other in [("ce_emotion", "emotion", "sentiment"), ("ce_sentiment", "sentiment", "emotion")]:
        got = grads_of(model, out.losses[term])
        assert all(got[n] for n in got if mine(n, own)), term
        assert not any(got[n] for n in got if mine(n, other)), term
        assert all(got[n] for n in got if ".shared." in n or n.startswith("project.")), term  # shared by both tasks

    got = grads_of(model, out.losses["balance"])
    assert all(got[n] for n in got if ".router." in n)  # the routers are what it balances
    assert not any(got[n] for n in got if n.startswith(("heads.", "fusion.")))
    def block(name):  # unitse.<modality>.<block>.... -> block index, else None
        parts = name.split(".")
        return int(parts[2]) if parts[0] == "unitse" else None

    last = model.config.num_blocks - 1
    assert not any(got[n] for n in got if block(n) == last and ".router." not in n)  # they feed no router
    assert any(got[n] for n in got if block(n) == 0 and ".shared." in n)  # block-1 experts feed block-2 routers


def test_score_term_trains_the_score_head_not_the_class_head(tasks):
    model = model_for(tasks["mosi"].spec).train()
    out = model(tasks["mosi"].splits["train"].collate([0, 1, 2, 3]))
    got = grads_of(model, out.losses["score_l1"])
    assert all(got[n] for n in got if n.startswith("score_head."))
    assert not any(got[n] for n in got if n.startswith("heads."))
    got = grads_of(model, out.losses["ce_sentiment"])
    assert not any(got[n] for n in got if n.startswith("score_head."))
    assert all(got[n] for n in got if n.startswith("heads.sentiment."))


def test_loss_weights_scale_their_terms(tasks):
    batch = tasks["meld"].splits["train"].collate([0, 1, 2])
    with torch.no_grad():
        base = model_for(tasks["meld"].spec).eval()(batch).losses
        scaled = model_for(tasks["meld"].spec, emotion_weight=2.0, sentiment_weight=0.5, balance_weight=0.03).eval()
        scaled = scaled(batch).losses
    torch.testing.assert_close(scaled["ce_emotion"], 2.0 * base["ce_emotion"])
    torch.testing.assert_close(scaled["ce_sentiment"], 0.5 * base["ce_sentiment"])
    torch.testing.assert_close(scaled["balance"], 3.0 * base["balance"])


def test_class_weights_apply_to_the_main_task_only(tasks):
    task = tasks["meld"]
    batch = task.splits["train"].collate([0, 1, 2])
    plain = model_for(task.spec).eval()
    weighted = build_model("mmolre", dataclasses.replace(task.spec, class_weights=[1.0, 5.0, 0.2]), SMALL).eval()
    weighted.load_state_dict(plain.state_dict())
    with torch.no_grad():
        a, b = weighted(batch), plain(batch)
    torch.testing.assert_close(a.logits, b.logits)
    assert abs(float(a.losses["ce_emotion"]) - float(b.losses["ce_emotion"])) > 1e-4
    torch.testing.assert_close(a.losses["ce_sentiment"], b.losses["ce_sentiment"])


# ---------------------------------------------------------------- learning, determinism, size


@pytest.mark.parametrize("kind", ["meld", "mosi"])
def test_overfits_a_tiny_batch(tasks, kind):
    task = tasks[kind]
    model = model_for(task.spec, dropout=0.0)
    batch = task.splits["train"].collate([0, 1, 2])
    out, first = overfit(model, batch, steps=200, lr=1e-2)
    real = batch.labels != IGNORE
    assert (out.logits.argmax(-1)[real] == batch.labels[real]).all()
    if kind == "meld":
        has = batch.sentiment != IGNORE
        assert (out.sentiment_logits.argmax(-1)[has] == batch.sentiment[has]).all()
    else:
        assert float(out.losses["score_l1"]) < 0.2
    assert float(out.loss) < 0.2 * first

def test_parameter_counts_against_full_rank_experts(tasks):
    spec = tasks["meld"].spec  # two modalities, two tasks
    model = model_for(spec)
    counts = parameter_counts(model)
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    # per modality and block: N shared experts + one per task
    assert counts["num_experts"] == 2 * 2 * (SMALL["num_shared"] + 2)
    # the dense equivalent is exactly the same model with rank = hidden (every expert full-rank)
    full = model_for(spec, rank=SMALL["hidden"])
    assert counts["dense_equivalent"] == sum(p.numel() for p in full.parameters())
    assert counts["dense_experts"] == sum(p.numel() for m in full.modules() if isinstance(m, LowRankExpert)
                                          for p in m.parameters())
    assert counts["experts"] < counts["dense_experts"]
    assert counts["total"] - counts["experts"] == counts["dense_equivalent"] - counts["dense_experts"]


# ---------------------------------------------------------------- the dialogue-context switch (a departure)


def test_dialogue_context_reaches_beyond_two_neighbours(tasks):
    """Without the switch an utterance sees +-2 neighbours (two kernel-3 blocks); with it, the whole dialogue."""
    task = tasks["emotion"]
    data = task.splits["train"]
    _, long, _ = shortest_and_longest(data)
    n = len(data.dialogues[long].rows)
    assert n >= 4  # the last utterance lies beyond the first one's +-2 window
    batch = data.collate([long])
    far = batch.features["text"].clone()
    far[0, n - 1] += 5.0  # change the last utterance only
    changed = Batch({**batch.features, "text": far}, batch.modality_mask, batch.mask, batch.speakers, batch.labels,
                    batch.sentiment, batch.score, batch.rows)
    for context, reaches in (("none", False), ("gru", True)):
        model = model_for(task.spec, dialogue_context=context).eval()
        with torch.no_grad():
            first = model(batch).logits[0, 0], model(changed).logits[0, 0]
        assert (not torch.allclose(*first, atol=1e-6)) == reaches, context
    with pytest.raises(ValueError, match="dialogue_context"):
        model_for(task.spec, dialogue_context="lstm")


def test_dialogue_context_keeps_padding_invariance(tasks):
    task = tasks["meld"]
    data = task.splits["train"]
    short, long, n = shortest_and_longest(data)
    model = model_for(task.spec, dialogue_context="gru").eval()
    alone, batch, together = alone_and_padded(model, data.collate, short, long, n)
    torch.testing.assert_close(together.logits[1, :n], alone.logits[0, :n], atol=1e-5, rtol=0)


def test_mmolre_context_is_mmolre_with_the_switch_on(tasks):
    """The leaderboard's variant: its own name, the same model as MMoLRE with dialogue_context="gru"."""
    task = tasks["meld"]
    batch = task.splits["train"].collate([0, 1])
    torch.manual_seed(0)
    variant = build_model("mmolre_context", task.spec, SMALL).eval()
    switched = model_for(task.spec, dialogue_context="gru").eval()
    assert variant.context is not None and variant.registry_name == "mmolre_context"
    assert MODELS["mmolre"].registry_name == "mmolre"
    switched.load_state_dict(variant.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(variant(batch).logits, switched(batch).logits)


# ---------------------------------------------------------------- batched experts (issue 33)


def matmul_kernels(fn) -> int:
    """Matrix-multiply and convolution kernels that `fn()` (a forward and backward) launches."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    kinds = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::convolution"}
    return sum(e.count for e in prof.key_averages() if e.key in kinds)


def test_batched_experts_equal_a_loop_over_the_experts():
    """low_rank_down / low_rank_mix (all experts in one matmul each) against each LowRankExpert run on its own and
    gated by hand: outputs and every expert's gradients, with padding, at the ends of dialogues and in between."""
    from erc.models.blocks import low_rank_down, low_rank_mix

    torch.manual_seed(0)
    experts = [LowRankExpert(6, 3) for _ in range(4)]
    x = torch.randn(2, 5, 6)
    mask = torch.tensor([[True, True, False, True, True], [True, True, True, False, False]])
    gates, _ = top_k_gates(torch.randn(2, 5, 4), 2)
    keep = mask.unsqueeze(-1).float()

    def grads(out):
        for e in experts:
            e.zero_grad()
        (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(1))).sum().backward()
        return [p.grad.clone() for e in experts for p in e.parameters()]

    batched = low_rank_mix(experts, low_rank_down(experts, x, mask), gates) * keep
    batched_grads = grads(batched)
    looped = sum(gates[..., e, None] * expert(x, mask) for e, expert in enumerate(experts))
    looped_grads = grads(looped)
    torch.testing.assert_close(batched, looped, atol=1e-6, rtol=1e-5)
    assert looped.abs().sum() > 0
    for a, b in zip(batched_grads, looped_grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_unitse_matmuls_do_not_grow_with_the_number_of_experts(tasks):
    """The experts run as one batched operation: MMoLRE's forward and backward launch as many matrix kernels with
    6 shared experts as with 2 (a loop over the experts launches some per expert)."""
    task = tasks["meld"]
    batch = task.splits["train"].collate(range(min(4, len(task.splits["train"]))))

    def step(num_shared):
        model = model_for(task.spec, num_shared=num_shared)
        return matmul_kernels(lambda: model(batch).loss.backward())

    assert step(2) == step(6)

"""MiSTER-E (erc/models/mister_e.py) on tiny generated dialogues (no Ray)."""

import dataclasses

import pytest
import torch

from erc.models import MODELS, ModelSpec, build_model
from erc.training.loop import seed_everything
from tests.fixtures import missing_audio_batch, one_torch_thread

SMALL = {"width": 16, "attn_dim": 12, "heads": 3, "gru_layers": 2, "cross_blocks": 2, "dropout": 0.1}
SUBSETS = [("text",), ("audio",), ("text", "audio")]
EXPERTS = {("text",): ["text"], ("audio",): ["speech"], ("text", "audio"): ["speech", "text", "cross"]}


@pytest.fixture(autouse=True)
def one_thread():
    """These models are tiny: on a shared 2-core machine, intra-op threads only add spin-waiting (~20x slower)."""
    with one_torch_thread():
        yield


def restrict(spec, modalities):
    return dataclasses.replace(spec, input_dims={m: spec.input_dims[m] for m in modalities})


def model_of(spec, seed=0, **overrides):
    torch.manual_seed(seed)
    return build_model("mister_e", spec, {**SMALL, **overrides})

def test_registered_with_the_paper_defaults():
    cfg = MODELS["mister_e"].Config()
    assert (cfg.width, cfg.gru_layers, tuple(cfg.kernel_sizes), cfg.cross_blocks, cfg.attn_dim, cfg.heads) == \
        (1024, 3, (1, 3, 5), 4, 120, 3)
    assert (cfg.dropout, cfg.gate_hidden, cfg.gate_temperature, cfg.focal_gamma) == (0.5, 10, 2.0, 3.0)
    assert (cfg.supcon_weight, cfg.supcon_temperature, cfg.kl_weight, cfg.kl_temperature) == (2.0, 1.0, 0.1, 1.0)
    model = build_model("mister_e", ModelSpec(input_dims={"text": 2048, "audio": 2048}, num_classes=6))
    assert model.expert_names == ["speech", "text", "cross"]
    assert model.experts["text"].gru.gru.hidden_size == 512
    assert model.cross.speech_in.weight.shape == (1024, 2048)
    attention = model.cross.attention  # (4 blocks x 2 steps, speech's and text's, ...); q, k, v stacked too
    assert attention.qkv_weight.shape == (8, 2, 3 * 120, 1024) and attention.out_weight.shape == (8, 2, 1024, 120)
    assert attention.heads == 3
    assert [layer.out_features for layer in model.gate.mlp if isinstance(layer, torch.nn.Linear)] == [10, 3]


def test_bad_configs_are_refused():
    with pytest.raises(ValueError, match="even"):
        build_model("mister_e", ModelSpec(input_dims={"text": 4}, num_classes=2), {"width": 15})
    with pytest.raises(ValueError, match="audio"):
        build_model("mister_e", ModelSpec(input_dims={"video": 4}, num_classes=2), SMALL)


@pytest.mark.parametrize("modalities", SUBSETS)
@pytest.mark.parametrize("which", ["emotion", "mosi"])
def test_output_shapes_and_loss_terms(emotion_task, mosi_task, which, modalities):
    task = emotion_task if which == "emotion" else mosi_task
    model = model_of(restrict(task.spec, modalities)).eval()
    assert model.expert_names == EXPERTS[modalities]
    batch = task.splits["train"].collate([0, 1, 2])
    B, T = batch.mask.shape
    C, E = task.spec.num_classes, len(model.expert_names)
    out = model(batch)
    assert out.logits.shape == (B, T, C)
    assert out.extras["gate"].shape == (B, T, E)
    assert out.extras["expert_logits"].shape == (B, T, E, C)
    torch.testing.assert_close(out.extras["gate"].sum(-1), torch.ones(B, T))
    torch.testing.assert_close(out.logits, (out.extras["gate"].unsqueeze(-1) * out.extras["expert_logits"]).sum(-2))
    if E == 1:
        assert (out.extras["gate"] == 1).all()
    assert (out.score is not None) == task.has_score
    if task.has_score:
        assert out.score.shape == (B, T)
    expected = {"focal_mix"} | ({"score_l1"} if task.has_score else set())
    if E == 3:
        expected |= {"focal_speech", "focal_text", "focal_cross", "supcon", "kl"}
    assert set(out.losses) == expected
    assert all(torch.isfinite(v) and v.dim() == 0 for v in out.losses.values())


def test_gate_depends_on_the_utterance_and_its_temperature(emotion_task):
    batch = emotion_task.splits["train"].collate([0, 1])
    real = batch.mask & batch.modality_mask["audio"]  # every expert available (see the missing-modality test)
    with torch.no_grad():
        gate = model_of(emotion_task.spec).eval()(batch).extras["gate"][real]
        flat = model_of(emotion_task.spec, gate_temperature=1e6).eval()(batch).extras["gate"][real]
    assert (gate - gate.mean(0)).abs().max() > 1e-4  # per utterance, not one weight per expert
    torch.testing.assert_close(flat, torch.full_like(flat, 1 / 3), atol=1e-4, rtol=0)


@pytest.mark.parametrize("modalities", SUBSETS + [("text", "audio", "video")])
def test_a_modality_matters_if_and_only_if_used(emotion_task, modalities):
    spec = emotion_task.spec
    dims = {m: spec.input_dims.get(m, 5) for m in modalities}
    model = model_of(dataclasses.replace(spec, input_dims=dims)).eval()
    batch = emotion_task.splits["train"].collate([0, 1, 2, 3])
    if "video" in modalities:  # a modality the paper does not use: accepted and ignored
        batch.features["video"] = torch.randn(*batch.mask.shape, 5)
        batch.modality_mask["video"] = batch.mask.clone()
    with torch.no_grad():
        out = model(batch)
        for m in ("text", "audio", "video"):
            if m not in batch.features:
                continue
            changed = dataclasses.replace(batch, features={**batch.features, m: batch.features[m] + 1.0})
            delta = (model(changed).logits - out.logits)[batch.mask].abs().max().item()
            assert (delta > 1e-4) == (m in modalities and m != "video"), m


def test_missing_modality_rows_are_masked(emotion_task):
    """The utterance without audio: its audio values do not matter, and its speech view leaves SupCon."""
    data = emotion_task.splits["train"]
    batch, pos = missing_audio_batch(data, more=1)
    assert not batch.modality_mask["audio"][0, pos] and batch.modality_mask["text"][0, pos]
    model = model_of(emotion_task.spec).eval()
    with torch.no_grad():
        before = model(batch)
        batch.features["audio"][0, pos] = 100.0
        after = model(batch)
    torch.testing.assert_close(after.logits, before.logits)
    for name in before.losses:
        torch.testing.assert_close(after.losses[name], before.losses[name])
    # Missing, the utterance's speech and cross-modal experts get no gate weight: only the text expert's logits.
    assert before.extras["gate"][0, pos].tolist() == [0.0, 1.0, 0.0]
    torch.testing.assert_close(before.logits[0, pos], before.extras["expert_logits"][0, pos, 1])
    # Marked present (with the same zero input), the speech view joins SupCon and the gate takes all three
    # experts: zeros posing as audio are not the same as missing audio, and only that utterance changes.
    batch.features["audio"][0, pos] = 0.0
    batch.modality_mask["audio"][0, pos] = True
    with torch.no_grad():
        present = model(batch)
    assert (present.extras["gate"][0, pos] > 0).all()
    assert not torch.allclose(present.logits[0, pos], before.logits[0, pos])
    others = torch.ones_like(batch.mask)
    others[0, pos] = False
    torch.testing.assert_close(present.logits[others], before.logits[others])
    assert abs(float(present.losses["supcon"]) - float(before.losses["supcon"])) > 1e-6

# Which parameter groups each loss term must reach (prefixes of parameter names); all others must get none.
CONTRASTIVE_VIEW = ("cross.speech_in", "cross.text_in", "cross.attention", "cross.speech_skip", "cross.text_skip")
REACHES = {
    "focal_mix": ("experts", "cross", "gate"),
    "focal_speech": ("experts.speech",),
    "focal_text": ("experts.text",),
    "focal_cross": ("cross",),
    "supcon": CONTRASTIVE_VIEW,
    "kl": ("experts", "cross"),
    "score_l1": ("experts", "cross", "gate", "score_heads"),
}


def test_every_loss_term_reaches_exactly_its_parameters(mosi_task):
    model = model_of(mosi_task.spec).train()
    seed_everything(0)
    out = model(mosi_task.splits["train"].collate(range(len(mosi_task.splits["train"]))))
    assert set(out.losses) == set(REACHES)
    named = list(model.named_parameters())
    for term, value in out.losses.items():
        assert torch.isfinite(value), term
        grads = torch.autograd.grad(value, [p for _, p in named], retain_graph=True, allow_unused=True)
        for (name, _), g in zip(named, grads):
            reached = g is not None and g.abs().sum() > 0
            if name.endswith("attention.qkv_bias") and g is not None:
                # A bias on every key (the middle third) shifts each query's scores by one constant: softmax
                # ignores it.
                assert g.unflatten(-1, (3, -1))[..., 1, :].abs().max() < 1e-6, (term, name)
            if name.startswith(REACHES[term]):
                assert reached and torch.isfinite(g).all(), (term, name)
            else:
                assert not reached, (term, name)


def test_class_weights_change_the_focal_terms_only(emotion_task):
    batch = emotion_task.splits["train"].collate([0, 1, 2])
    plain = model_of(emotion_task.spec).eval()
    weighted = model_of(dataclasses.replace(emotion_task.spec, class_weights=[1.0, 5.0, 0.2])).eval()
    weighted.load_state_dict(plain.state_dict())
    with torch.no_grad():
        a, b = weighted(batch), plain(batch)
    torch.testing.assert_close(a.logits, b.logits)
    for name in ("focal_mix", "focal_speech", "focal_text", "focal_cross"):
        assert abs(float(a.losses[name]) - float(b.losses[name])) > 1e-5, name
    for name in ("supcon", "kl"):
        torch.testing.assert_close(a.losses[name], b.losses[name])


def test_experts_batched_equal_each_expert_on_its_own(emotion_task):
    """The speech and text experts run as one recurrence (stacked_bigru) and their conv branches as one matmul:
    each expert's logits equal its own convolutions and packed nn.GRU, run on their own (eval mode)."""
    import torch.nn.functional as F

    model = model_of(emotion_task.spec).eval()
    batch = emotion_task.splits["train"].collate(range(4))
    with torch.no_grad():
        out = model(batch)
        for e, (m, name) in enumerate([("audio", "speech"), ("text", "text")]):
            expert, mask = model.experts[name], batch.mask
            x = batch.features[m] * batch.modality_mask[m].unsqueeze(-1).float()
            local = sum(F.relu(conv(x, mask)) for conv in expert.convs)
            state = (expert.gru.packed(local, mask) + expert.skip(x)) * mask.unsqueeze(-1).float()
            torch.testing.assert_close(out.extras["expert_logits"][..., e, :][mask], expert.head(state)[mask],
                                       atol=1e-5, rtol=1e-5)


def test_a_checkpoint_from_before_the_stacked_attention_loads(emotion_task):
    """A state dict in the former layout (one q, k, v, out and norm per attention of each block) loads into the
    stacked parameters and gives the saved model's outputs."""
    saved = model_of(emotion_task.spec, seed=0).eval()
    state = saved.state_dict()
    A = SMALL["attn_dim"]
    names = [("speech_from_text", "text_from_speech"), ("speech_self", "text_self")]
    for c in range(2 * SMALL["cross_blocks"]):
        block, pair = divmod(c, 2)
        for g, name in enumerate(names[pair]):
            at = f"cross.blocks.{block}.{name}"
            for i, x in enumerate("qkv"):
                state[f"{at}.{x}.weight"] = state["cross.attention.qkv_weight"][c, g, i * A:(i + 1) * A]
                state[f"{at}.{x}.bias"] = state["cross.attention.qkv_bias"][c, g, 0, i * A:(i + 1) * A]
            state[f"{at}.out.weight"] = state["cross.attention.out_weight"][c, g]
            for layer, kind in [("out", "bias"), ("norm", "weight"), ("norm", "bias")]:
                state[f"{at}.{layer}.{kind}"] = state[f"cross.attention.{layer}_{kind}"][c, g, 0]
    for kind in ("qkv_weight", "qkv_bias", "out_weight", "out_bias", "norm_weight", "norm_bias"):
        del state[f"cross.attention.{kind}"]
    loaded = model_of(emotion_task.spec, seed=1).eval()
    loaded.load_state_dict(state)  # strict: every former key used, none missing
    batch = emotion_task.splits["train"].collate([0, 1, 2])
    with torch.no_grad():
        torch.testing.assert_close(loaded(batch).logits, saved(batch).logits, rtol=0, atol=0)

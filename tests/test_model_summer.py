"""SUMMER (erc/models/summer.py): shapes per modality subset, padding, losses and their gradients, the frozen
IKD teacher, checkpoints, overfitting and seeding, on small generated dialogues (no Ray)."""

import dataclasses
import json

import pytest
import torch

from erc.data.dialogues import IGNORE, Batch
from erc.models import MODELS, ModelOutput, ModelSpec, build_model
from erc.models.checkpoint import load_checkpoint, save_checkpoint
from tests.fixtures import alone_and_padded, one_torch_thread, overfit, seeded_loss

DIMS = {"text": 16, "audio": 8, "video": 6}
CLASSES = 3
SMALL = {"hidden": 32, "heads": 4, "ff_dim": 32, "dropout": 0.1, "num_experts": 4, "top_k": 2, "expert_rank": 4,
         "local_window": 2}
SUBSETS = [("text",), ("audio",), ("video",), ("text", "audio"), ("text", "video"), ("audio", "video"),
           ("text", "audio", "video")]


# ---------------------------------------------------------------- generated dialogues


def make_dialogues(lengths, seed=0, dims=DIMS, with_score=False):
    """Dialogues whose text (and, weaker, video) depends on the label; audio is noise."""
    g = torch.Generator().manual_seed(seed)
    means = {m: 2.0 * torch.randn(CLASSES, d, generator=g) for m, d in dims.items()}
    dialogues = []
    for n in lengths:
        labels = torch.randint(0, CLASSES, (n,), generator=g)
        feats = {m: torch.randn(n, d, generator=g) for m, d in dims.items()}
        for m in ("text", "video"):
            if m in feats:
                feats[m] = feats[m] * (0.3 if m == "text" else 1.0) + means[m][labels]
        dialogues.append({
            "features": feats, "labels": labels, "speakers": torch.randint(0, 3, (n,), generator=g),
            "score": (torch.randn(n, generator=g) if with_score else torch.full((n,), float("nan"))),
            "present": {m: torch.ones(n, dtype=torch.bool) for m in dims},
        })
    return dialogues


def collate(dialogues, pad_to=None) -> Batch:
    B = len(dialogues)
    T = max(len(d["labels"]) for d in dialogues)
    T = max(T, pad_to or 0)
    mask = torch.zeros(B, T, dtype=torch.bool)
    labels = torch.full((B, T), IGNORE)
    speakers = torch.zeros(B, T, dtype=torch.long)
    score = torch.full((B, T), float("nan"))
    rows = torch.full((B, T), -1)
    modalities = dialogues[0]["features"].keys()
    features = {m: torch.zeros(B, T, dialogues[0]["features"][m].shape[1]) for m in modalities}
    modality_mask = {m: torch.zeros(B, T, dtype=torch.bool) for m in modalities}
    for b, d in enumerate(dialogues):
        n = len(d["labels"])
        mask[b, :n], labels[b, :n], speakers[b, :n], score[b, :n] = True, d["labels"], d["speakers"], d["score"]
        rows[b, :n] = torch.arange(n) + 100 * b
        for m in modalities:
            features[m][b, :n] = d["features"][m]
            modality_mask[m][b, :n] = d["present"][m]
    return Batch(features, modality_mask, mask, speakers, labels, torch.full((B, T), IGNORE), score, rows)


def spec_for(modalities=tuple(DIMS), **kw) -> ModelSpec:
    return ModelSpec(input_dims={m: DIMS[m] for m in modalities}, num_classes=CLASSES, **kw)


def summer(spec, seed=0, **overrides):
    """A small SUMMER; the experts' relative-position biases (zero at init) are drawn at random, so that
    tests see them act."""
    torch.manual_seed(seed)
    model = build_model("summer", spec, {**SMALL, **overrides})
    with torch.no_grad():
        for layers in model.sdmoe.values():
            for layer in layers:
                layer.moe.relative.normal_()
    return model


def write_teacher(directory, *, text_dim=DIMS["text"], num_classes=CLASSES, seed=1):
    """A text-only baseline saved in erc.models.checkpoint.save_checkpoint's format."""
    spec = ModelSpec(input_dims={"text": text_dim}, num_classes=num_classes)
    config = {"hidden": 8, "dropout": 0.2}
    torch.manual_seed(seed)
    teacher = build_model("baseline", spec, config)
    directory.mkdir(parents=True, exist_ok=True)
    save_checkpoint(directory, teacher, name="baseline", config=config, spec=spec, feature_stats={}, epoch=0)
    return directory


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are tiny: one thread is faster, and far faster when the 2 cores are busy (measured 40x)."""
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    return str(write_teacher(tmp_path_factory.mktemp("summer") / "teacher"))


IKD_TERMS = {"kd_cross", "align", "smooth"}


# ---------------------------------------------------------------- interface and shapes


def test_registered_with_documented_defaults():
    assert "summer" in MODELS
    c = MODELS["summer"].Config()
    assert (c.num_experts, c.top_k, c.temperature, c.smooth_mix) == (4, 2, 2.0, 0.1)
    assert (c.kappa_cross, c.kappa_align, c.kappa_smooth) == (1.0, 1.0, 1.0)
    assert c.teacher_checkpoint is None
    with pytest.raises(ValueError, match="subset"):
        build_model("summer", ModelSpec(input_dims={"depth": 4}, num_classes=2), SMALL)
    with pytest.raises(ValueError, match="top_k"):
        build_model("summer", spec_for(), {**SMALL, "top_k": 5})


@pytest.mark.parametrize("modalities", SUBSETS, ids="+".join)
def test_output_shapes_for_each_modality_subset(modalities):
    spec = spec_for(modalities, has_score=True)
    model = summer(spec).eval()
    batch = collate(make_dialogues([5, 3, 7], with_score=True))
    B, T = batch.mask.shape
    with torch.no_grad():
        out = model(batch)
    assert isinstance(out, ModelOutput)
    assert out.logits.shape == (B, T, CLASSES)
    assert out.score is not None and out.score.shape == (B, T)
    assert set(out.losses) == {"ce", "balance", "score_l1"}  # no teacher: no IKD terms
    assert all(torch.isfinite(v) for v in out.losses.values())
    M = len(modalities)
    K = M + M * (M - 1) // 2
    assert model.fusion_tokens[:M] == list(modalities) and len(model.fusion_tokens) == K
    assert out.extras["hcmf_weights"].shape == (B, T, K)
    torch.testing.assert_close(out.extras["hcmf_weights"].sum(-1), torch.ones(B, T))
    assert out.extras["hidden"].shape == (B, T, SMALL["hidden"])
    routers = {k for k in out.extras if k.startswith("router.")}
    assert routers == {f"router.{m}.0" for m in modalities}
    for key in routers:
        gates = out.extras[key]
        assert gates.shape == (B, T, SMALL["num_experts"])
        assert ((gates > 0).sum(-1) == SMALL["top_k"]).all()  # sparse: exactly top-k experts per utterance
        torch.testing.assert_close(gates.sum(-1), torch.ones(B, T))
    # a modality changes the output if and only if the model uses it
    for m in DIMS:
        changed = collate(make_dialogues([5, 3, 7], with_score=True))
        changed.features[m] = changed.features[m] + 1.0
        with torch.no_grad():
            delta = (model(changed).logits - out.logits)[batch.mask].abs().max().item()
        assert (delta > 1e-4) if m in modalities else (delta == 0.0), m


def test_emotion_spec_has_no_score():
    model = summer(spec_for(("text", "audio"))).eval()
    out = model(collate(make_dialogues([4, 6])))
    assert out.score is None and "score_l1" not in out.losses


def test_router_is_dynamic_and_its_bias_matters():
    """Different utterances pick different experts, and the expert bias changes the attention output."""
    model = summer(spec_for(("text",)), dropout=0.0).eval()
    batch = collate(make_dialogues([8, 8, 8, 8]))
    with torch.no_grad():
        out = model(batch)
        chosen = (out.extras["router.text.0"] > 0)[batch.mask]
        assert len({tuple(row.tolist()) for row in chosen}) > 1
        for p in model.sdmoe["text"][0].moe.key.parameters():
            p.mul_(3.0)
        assert (model(batch).logits - out.logits)[batch.mask].abs().max() > 1e-4

# ---------------------------------------------------------------- padding


@pytest.mark.parametrize("with_teacher", [False, True])
def test_padding_invariance(teacher_dir, with_teacher):
    spec = spec_for(has_score=True)
    model = summer(spec, teacher_checkpoint=teacher_dir if with_teacher else None).eval()
    short, long = make_dialogues([3, 9], seed=4, with_score=True)
    n = 3
    alone, padded_batch, padded = alone_and_padded(model, collate, short, long, n)
    torch.testing.assert_close(padded.logits[1, :n], alone.logits[0, :n], atol=1e-5, rtol=0)
    torch.testing.assert_close(padded.score[1, :n], alone.score[0, :n], atol=1e-5, rtol=0)
    for key in [k for k in alone.extras if k.startswith("router.")] + ["hcmf_weights", "hidden"]:
        torch.testing.assert_close(padded.extras[key][1, :n], alone.extras[key][0, :n], atol=1e-5, rtol=0)
    if with_teacher:
        torch.testing.assert_close(padded.extras["teacher_logits"][1, :n], alone.extras["teacher_logits"][0, :n],
                                   atol=1e-5, rtol=0)


def test_loss_terms_do_not_change_with_extra_padding(teacher_dir):
    spec = spec_for(has_score=True)
    model = summer(spec, teacher_checkpoint=teacher_dir).eval()
    dialogues = make_dialogues([4, 6, 5], seed=2, with_score=True)
    with torch.no_grad():
        tight, loose = model(collate(dialogues)), model(collate(dialogues, pad_to=11))
    assert set(tight.losses) == {"ce", "balance", "score_l1"} | IKD_TERMS
    assert set(loose.losses) == set(tight.losses)
    for name in tight.losses:
        torch.testing.assert_close(loose.losses[name], tight.losses[name], atol=1e-5, rtol=1e-5, msg=name)


# ---------------------------------------------------------------- losses, gradients, the teacher


def grads_of(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward(retain_graph=True)
    return {name: p.grad for name, p in model.named_parameters()}


def nonzero(grads, prefix):
    return any(g is not None and g.abs().sum() > 0 for name, g in grads.items() if name.startswith(prefix))


def test_every_term_finite_and_reaches_what_it_should(teacher_dir):
    model = summer(spec_for(has_score=True), teacher_checkpoint=teacher_dir).train()
    out = model(collate(make_dialogues([6, 8, 5, 7], seed=3, with_score=True)))
    assert set(out.losses) == {"ce", "balance", "score_l1"} | IKD_TERMS
    assert all(torch.isfinite(v) and v > 0 for v in out.losses.values())
    teacher_names = [name for name, _ in model.named_parameters() if name.startswith("teacher.")]
    assert teacher_names and all(not p.requires_grad for p in model.teacher.parameters())

    expected = {  # term -> (parameters it must reach, parameters it must not reach)
        "ce": (["classifier", "context", "pooling", "pair_fusion", "sdmoe", "inputs"], ["to_teacher", "score_head"]),
        "balance": (["sdmoe.text.0.moe.router"], ["classifier", "context", "to_teacher", "sdmoe.text.0.moe.key"]),
        "kd_cross": (["to_teacher", "context", "pair_fusion", "inputs"], ["classifier", "score_head"]),
        "align": (["classifier", "context", "inputs"], ["to_teacher", "score_head"]),
        "smooth": (["classifier", "context", "inputs"], ["to_teacher", "score_head"]),
        "score_l1": (["score_head", "context"], ["classifier", "to_teacher"]),
    }
    for term, (reach, avoid) in expected.items():
        grads = grads_of(model, out.losses[term])
        assert all(torch.isfinite(g).all() for g in grads.values() if g is not None), term
        for prefix in reach:
            assert nonzero(grads, prefix), (term, prefix)
        for prefix in avoid:
            assert not nonzero(grads, prefix), (term, prefix)
        assert all(grads[name] is None for name in teacher_names), term

    grads = grads_of(model, out.loss)  # the total reaches every student parameter
    for name, g in grads.items():
        if name.startswith("teacher."):
            assert g is None, name
        else:
            assert g is not None and g.abs().sum() > 0, name


def test_teacher_stays_frozen_in_eval_and_unchanged(teacher_dir):
    model = summer(spec_for(("text", "audio")), teacher_checkpoint=teacher_dir)
    before = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    batch = collate(make_dialogues([5, 6, 4], seed=5))
    student_before = model.classifier.weight.detach().clone()
    for _ in range(3):
        model.train()
        assert model.training and not model.teacher.training
        assert not any(m.training for m in model.teacher.modules())
        loss = model(batch).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    for k, v in model.teacher.state_dict().items():
        torch.testing.assert_close(v, before[k], atol=0, rtol=0, msg=k)
    assert not torch.equal(model.classifier.weight, student_before)  # while the student did move
    # the teacher's output in the student equals the saved teacher's own
    reference, _ = load_checkpoint(teacher_dir)
    with torch.no_grad():
        text_batch = Batch({"text": batch.features["text"]}, {"text": batch.modality_mask["text"]}, batch.mask,
                           batch.speakers, batch.labels, batch.sentiment, batch.score, batch.rows)
        torch.testing.assert_close(model.eval()(batch).extras["teacher_logits"], reference(text_batch).logits)


def test_no_ikd_terms_without_teacher_or_text(teacher_dir):
    no_text = summer(spec_for(("audio", "video")), teacher_checkpoint=teacher_dir)
    assert no_text.teacher is None
    assert not IKD_TERMS & set(no_text(collate(make_dialogues([4, 5]))).losses)
    plain = summer(spec_for(("text", "audio")))
    assert plain.teacher is None and not any(n.startswith("teacher.") for n in plain.state_dict())


def test_incompatible_teacher_is_refused(tmp_path):
    wrong_dim = write_teacher(tmp_path / "dim", text_dim=DIMS["text"] + 1)
    with pytest.raises(ValueError, match="input dims"):
        summer(spec_for(), teacher_checkpoint=str(wrong_dim))
    wrong_classes = write_teacher(tmp_path / "classes", num_classes=CLASSES + 2)
    with pytest.raises(ValueError, match="classes"):
        summer(spec_for(), teacher_checkpoint=str(wrong_classes))


def test_student_checkpoint_round_trip(teacher_dir, tmp_path):
    """The student's checkpoint (teacher weights inside) loads through erc.models.checkpoint.load_checkpoint."""
    spec = spec_for(("text", "audio"))
    config = {**SMALL, "teacher_checkpoint": teacher_dir}
    model = summer(spec, **config)
    batch = collate(make_dialogues([5, 6], seed=6))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(2):
        optimizer.zero_grad()
        model(batch).loss.backward()
        optimizer.step()
    assert any(k.startswith("teacher.") for k in model.state_dict())
    torch.save({"state_dict": model.state_dict(), "feature_stats": {}}, tmp_path / "model.pt")
    (tmp_path / "model.json").write_text(json.dumps({
        "model": "summer", "model_config": config, "spec": dataclasses.asdict(spec), "epoch": 1,
        "train_config": {}, "metrics": {}}))
    loaded, info = load_checkpoint(tmp_path)
    assert info["model"] == "summer" and not loaded.training and not loaded.teacher.training
    model.eval()
    with torch.no_grad():
        a, b = model(batch), loaded(batch)
    torch.testing.assert_close(b.logits, a.logits)
    for name in a.losses:
        torch.testing.assert_close(b.losses[name], a.losses[name], msg=name)


def test_class_weights_change_ce_and_smooth(teacher_dir):
    batch = collate(make_dialogues([5, 6, 4], seed=7))
    plain = summer(spec_for(("text",)), teacher_checkpoint=teacher_dir).eval()
    weighted = summer(dataclasses.replace(spec_for(("text",)), class_weights=[1.0, 5.0, 0.2]),
                      teacher_checkpoint=teacher_dir).eval()
    weighted.load_state_dict(plain.state_dict())
    with torch.no_grad():
        a, b = weighted(batch), plain(batch)
    torch.testing.assert_close(a.logits, b.logits)
    for name in ("ce", "smooth"):
        assert abs(float(a.losses[name]) - float(b.losses[name])) > 1e-4, name
    torch.testing.assert_close(a.losses["align"], b.losses["align"])


@pytest.mark.parametrize("latent", ["cosine", "mse"])
def test_latent_kd_is_zero_when_the_projection_matches_the_teacher(teacher_dir, latent):
    """kd_cross measures the distance between the projected student state and the teacher's hidden state."""
    model = summer(spec_for(("text",)), teacher_checkpoint=teacher_dir, latent_loss=latent).eval()
    batch = collate(make_dialogues([5, 4], seed=8))
    with torch.no_grad():
        out = model(batch)
        assert out.losses["kd_cross"] > 1e-3
        hidden = out.extras["hidden"][batch.mask]
        target = model.teacher(Batch({"text": batch.features["text"]}, {"text": batch.modality_mask["text"]},
                                     batch.mask, batch.speakers, batch.labels, batch.sentiment, batch.score,
                                     batch.rows)).extras["hidden"][batch.mask]
        # least-squares projection from the student state onto the teacher state (exact: few utterances)
        X = torch.cat([hidden, torch.ones(len(hidden), 1)], 1)
        solution = torch.linalg.lstsq(X, target).solution
        model.to_teacher.weight.copy_(solution[:-1].T)
        model.to_teacher.bias.copy_(solution[-1])
        assert model(batch).losses["kd_cross"] < 1e-4


# ---------------------------------------------------------------- learning and seeding


def test_learns_a_tiny_batch_with_video():
    """The contract's tiny batch has text and audio; SUMMER's own has video too (its three-way fusion)."""
    model = summer(spec_for(), dropout=0.0)
    batch = collate(make_dialogues([6, 5, 7], seed=9))
    real = batch.labels != IGNORE
    out, first = overfit(model, batch, steps=150, lr=3e-3)
    assert (out.logits.argmax(-1)[real] == batch.labels[real]).all()
    assert float(out.losses["ce"]) < 0.1 * first


def test_same_seed_same_loss_with_the_teacher(teacher_dir):
    """With the IKD teacher's terms in the loss (the contract runs SUMMER without a teacher)."""
    batch = collate(make_dialogues([5, 6, 4], seed=10, with_score=True))
    config = {**SMALL, "teacher_checkpoint": teacher_dir}
    spec = spec_for(has_score=True)
    assert seeded_loss("summer", spec, config, batch, 0) == seeded_loss("summer", spec, config, batch, 0)
    assert seeded_loss("summer", spec, config, batch, 0) != seeded_loss("summer", spec, config, batch, 1)

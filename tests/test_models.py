"""The model interface and the context baseline, on tiny generated dialogues (no Ray)."""

import dataclasses

import pytest
import torch

from erc.models import MODELS, ModelOutput, ModelSpec, build_model
from tests.fixtures import AUDIO_DIM, TEXT_DIM

SMALL = {"hidden": 16, "dropout": 0.1}


def test_registry_and_config_overrides():
    assert "baseline" in MODELS
    spec = ModelSpec(input_dims={"text": 4}, num_classes=2)
    model = build_model("baseline", spec, {"hidden": 8})
    assert model.config.hidden == 8
    assert model.config.dropout == MODELS["baseline"].Config().dropout
    with pytest.raises(KeyError, match="unknown config keys"):
        build_model("baseline", spec, {"hiden": 8})
    with pytest.raises(KeyError, match="unknown model"):
        build_model("no-such-model", spec)


def test_spec_from_the_prepared_data(emotion_task, mosi_task):
    assert emotion_task.spec.input_dims == {"text": TEXT_DIM, "audio": AUDIO_DIM}
    assert emotion_task.spec.num_classes == 3 and not emotion_task.spec.has_score
    assert mosi_task.spec.num_classes == 2 and mosi_task.spec.has_score
    assert mosi_task.target == "sentiment" and mosi_task.labels == ["negative", "positive"]


def test_output_shapes_mosi(mosi_task):
    torch.manual_seed(0)
    model = build_model("baseline", mosi_task.spec, SMALL).eval()
    batch = mosi_task.splits["train"].collate([0, 1, 2])
    B, T = batch.mask.shape
    assert T == max(len(mosi_task.splits["train"].dialogues[i].rows) for i in range(3))
    out = model(batch)
    assert isinstance(out, ModelOutput)
    assert out.logits.shape == (B, T, 2)
    assert out.score is not None and out.score.shape == (B, T)
    assert set(out.losses) == {"ce", "score_l1"}
    assert torch.isfinite(out.loss)


def test_output_shapes_emotion_has_no_score(emotion_task):
    model = build_model("baseline", emotion_task.spec, SMALL).eval()
    batch = emotion_task.splits["valid"].collate([0, 1])
    out = model(batch)
    assert out.logits.shape == (*batch.mask.shape, 3)
    assert out.score is None
    assert set(out.losses) == {"ce"}


@pytest.mark.parametrize("modalities", [("text",), ("audio",), ("text", "audio")])
def test_modality_subsets(emotion_task, modalities):
    spec = dataclasses.replace(emotion_task.spec, input_dims={m: emotion_task.spec.input_dims[m] for m in modalities})
    torch.manual_seed(0)
    model = build_model("baseline", spec, SMALL).eval()
    assert sorted(model.encoders) == sorted(modalities)
    batch = emotion_task.splits["train"].collate([0, 1, 2, 3])
    out = model(batch)
    assert out.logits.shape == (*batch.mask.shape, 3)
    real = batch.mask
    for m in ("text", "audio"):  # a modality changes the output if and only if the model uses it
        changed = emotion_task.splits["train"].collate([0, 1, 2, 3])
        changed.features[m] = changed.features[m] + 1.0
        delta = (model(changed).logits - out.logits)[real].abs().max().item()
        if m in modalities:
            assert delta > 1e-4, m
        else:
            assert delta == 0.0, m



def test_losses_finite_and_every_parameter_gets_gradient(mosi_task):
    torch.manual_seed(0)
    model = build_model("baseline", mosi_task.spec, SMALL).train()
    out = model(mosi_task.splits["train"].collate(range(len(mosi_task.splits["train"]))))
    assert all(torch.isfinite(v) for v in out.losses.values())
    out.loss.backward()
    names = [name for name, p in model.named_parameters()]
    assert any(n.startswith("score_head") for n in names) and any(n.startswith("encoders.audio") for n in names)
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_class_weights_change_the_loss(emotion_task):
    batch = emotion_task.splits["train"].collate([0, 1, 2])
    torch.manual_seed(0)
    plain = build_model("baseline", emotion_task.spec, SMALL).eval()
    weighted_spec = dataclasses.replace(emotion_task.spec, class_weights=[1.0, 5.0, 0.2])
    weighted = build_model("baseline", weighted_spec, SMALL).eval()
    weighted.load_state_dict(plain.state_dict())
    with torch.no_grad():
        a, b = weighted(batch), plain(batch)
    torch.testing.assert_close(a.logits, b.logits)
    assert abs(float(a.loss) - float(b.loss)) > 1e-4

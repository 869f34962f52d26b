"""Per-utterance outputs of every model, missing-modality robustness and gate statistics, on tiny fixtures (no Ray)."""

import math

import numpy as np
import pandas as pd
import pytest
import torch

from erc.data.dialogues import IGNORE
from erc.evaluation import gates as gate_stats
from erc.evaluation import robustness
from erc.models import build_model
from erc.evaluation.inference import GateOutputs, Outputs, infer
from erc.training.loop import seed_everything
from tests.fixtures import EMOTIONS, MISSING_AUDIO_ROW, one_torch_thread

SMALL = {
    "baseline": {"hidden": 16},
    "mister_e": {"width": 16, "attn_dim": 12, "heads": 3, "gru_layers": 1, "cross_blocks": 1, "dropout": 0.1},
    "sdt": {"hidden": 32, "heads": 4, "ff_dim": 32, "dropout": 0.1},
    "summer": {"hidden": 32, "heads": 4, "ff_dim": 32, "dropout": 0.1, "num_experts": 4, "top_k": 2, "expert_rank": 4},
    "mmolre": {"hidden": 32, "rank": 4, "num_shared": 3, "top_k": 2, "dropout": 0.1},
}
GATES = {  # gate name -> expert names, top-k (None: dense), for the tiny emotion task (text + audio)
    "baseline": {},
    "mister_e": {"gate": (["speech", "text", "cross"], None)},
    "sdt": {"modality_gate": (["audio", "text"], None)},
    "summer": {"router.text.0": ([f"expert{e}" for e in range(4)], 2), "router.audio.0": ([f"expert{e}" for e in range(4)], 2),
               "hcmf": (["text", "audio", "text+audio"], None)},
    "mmolre": {**{f"router.{m}.emotion.{i}": (["shared0", "shared1", "shared2", "emotion-specific"], 2)
                  for m in ("audio", "text") for i in (0, 1)}, "fusion.emotion": (["audio", "text"], None)},
}


@pytest.fixture(autouse=True)
def one_thread():
    with one_torch_thread():
        yield


def trained(name, task, steps=40):
    """`name` trained on the tiny task's training split (a few Adam steps over all of it), in eval mode."""
    seed_everything(0)
    model = build_model(name, task.spec, SMALL[name])
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    train = task.splits["train"]
    for step in range(steps):
        model.train()
        loss = model(train.collate(range(len(train)))).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.fixture(scope="module")
def models(emotion_task):
    with one_torch_thread():
        return {name: trained(name, emotion_task) for name in SMALL}


@pytest.mark.parametrize("name", sorted(SMALL))
def test_every_model_gives_probabilities_and_its_gates(models, emotion_task, name):
    data = emotion_task.splits["train"]
    out = infer(models[name], data, batch_size=3)
    n = data.num_utterances
    assert out.probs.shape == (n, len(EMOTIONS)) and np.all(np.diff(out.rows) > 0)  # every utterance, row order
    np.testing.assert_allclose(out.probs.sum(-1), 1.0, atol=1e-5)
    assert {k: (g.names, g.top_k) for k, g in out.gates.items()} == GATES[name]
    for key, g in out.gates.items():
        assert g.weights.shape == (n, len(g.names)) and g.valid.any()
        np.testing.assert_allclose(g.weights[g.valid].sum(-1), 1.0, atol=1e-5)
        if g.top_k is not None:  # a sparse router: exactly k experts per utterance
            assert ((g.weights[g.valid] > 0).sum(-1) == g.top_k).all()
        if key.startswith("router.audio"):  # the utterance without audio is not one the audio router ran on
            assert not g.valid[out.rows == MISSING_AUDIO_ROW].any()


@pytest.mark.parametrize("name", sorted(SMALL))
def test_removing_a_modality_goes_through_the_mask_not_zeros(models, emotion_task, name):
    """Text carries the fixture's labels: without it weighted F1 falls on held-out dialogues (on the training
    split a model may have memorised the noise of the audio). Removing it (mask False) changes the predictions,
    and differs from zero text features marked present."""
    model, data = models[name], emotion_task.splits["valid"]
    full = infer(model, data)
    rows = {r["modality"]: r for r in robustness.modality_drops(model, data, EMOTIONS, full=full)}
    assert set(rows) == {"audio", "text"}
    assert rows["text"]["wf1_all"] == pytest.approx(robustness.weighted_f1(full, EMOTIONS))
    assert rows["text"]["wf1_all"] > 80 and rows["text"]["wf1_drop"] > 20 and rows["text"]["changed"] > 20
    assert rows["text"]["wf1_drop"] == pytest.approx(rows["text"]["wf1_all"] - rows["text"]["wf1_without"])
    dropped, zeros = infer(model, data, drop=("text",)), infer(model, data, zeros=("text",))
    assert np.abs(dropped.probs - zeros.probs).max() > 1e-3
    with pytest.raises(ValueError, match="video"):
        infer(model, data, drop=("video",))


def test_single_modality_model_has_nothing_to_remove(tiny_emotion):
    from tests.fixtures import task_of

    text_only = task_of(tiny_emotion, {"text": "text16"})
    model = build_model("baseline", text_only.spec, {"hidden": 8})
    assert robustness.modality_drops(model, text_only.splits["valid"], EMOTIONS) == []


def test_gate_statistics_on_a_known_gate(emotion_task):
    """MiSTER-E whose gate ignores its input (last layer weights 0, bias b): weights softmax(b / T) = [.2, .5, .3]
    wherever all experts are available, [0, 1, 0] on the utterance without audio."""
    seed_everything(0)
    model = build_model("mister_e", emotion_task.spec, SMALL["mister_e"]).eval()
    known = torch.tensor([0.2, 0.5, 0.3])
    last = model.gate.mlp[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.copy_(known.log() * model.config.gate_temperature)
    data = emotion_task.splits["train"]
    out = infer(model, data)
    stats = gate_stats.statistics(out, EMOTIONS).set_index("expert")
    missing = out.rows == MISSING_AUDIO_ROW
    n = len(out.rows)
    expected = (known.numpy() * (n - 1) + np.array([0, 1, 0])) / n
    np.testing.assert_allclose(stats["mean"].to_numpy(), expected, atol=1e-5)
    c = int(out.labels[missing][0])  # the class of the utterance without audio
    of_c = int((out.labels == c).sum())
    for k, label in enumerate(EMOTIONS):
        want = known.numpy() if k != c else (known.numpy() * (of_c - 1) + np.array([0, 1, 0])) / of_c
        np.testing.assert_allclose(stats[f"w_{label}"].to_numpy(), want, atol=1e-5)
    np.testing.assert_allclose(stats["load"].to_numpy(), [0.0, 1.0, 0.0])  # text is every utterance's largest
    assert (stats["utterances"] == n).all()


def test_load_of_a_sparse_router_counts_chosen_slots():
    w = np.array([[0.7, 0.3, 0.0], [0.6, 0.0, 0.4], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]])
    g = GateOutputs(["e0", "e1", "e2"], w, np.array([True, True, True, False]), top_k=2)
    np.testing.assert_allclose(gate_stats.load(g), [3 / 6, 2 / 6, 1 / 6])
    dense = GateOutputs(["e0", "e1", "e2"], w, np.ones(4, bool))  # the largest weight: e0, e0, e0 (first of ties), e2
    np.testing.assert_allclose(gate_stats.load(dense), [0.75, 0, 0.25])
    out = Outputs(rows=np.arange(4), labels=np.array([0, 1, IGNORE, 0]), probs=np.full((4, 3), 1 / 3), gates={"r": g})
    stats = gate_stats.statistics(out, ["x", "y", "z"])
    np.testing.assert_allclose(stats["w_x"], [0.7, 0.3, 0.0])  # row 3 (class x) is not valid for this router
    np.testing.assert_allclose(stats["w_y"], [0.6, 0.0, 0.4])
    assert stats["w_z"].isna().all() and stats["labelled"].tolist() == [2, 2, 2]


def test_plot_and_tables(models, emotion_task, tmp_path):
    out = infer(models["mmolre"], emotion_task.splits["valid"])
    stats = gate_stats.statistics(out, EMOTIONS)
    gate_stats.plot(stats, EMOTIONS, "tiny mmolre", tmp_path / "g.png")
    assert (tmp_path / "g.png").read_bytes()[:4] == b"\x89PNG"
    rows = pd.DataFrame([{"dataset": "tiny", "model": m, "seed": s, "modality": "text", "wf1_all": 90.0,
                          "wf1_without": 90.0 - d, "wf1_drop": d, "changed": 50.0}
                         for m, drops in (("a", (10.0, 20.0)), ("b", (5.0,))) for s, d in enumerate(drops)])
    table = robustness.summarise(rows).set_index("model")
    assert table.loc["a", "wf1_drop_mean"] == 15.0 and table.loc["a", "wf1_drop_std"] == pytest.approx(math.sqrt(50))
    assert math.isnan(table.loc["b", "wf1_drop_std"])
    md = robustness.to_markdown(robustness.summarise(rows))
    assert "drop without text" in md and "| tiny | a | 90.00 | +15.00 ± 7.07 |" in md and "| tiny | b | 90.00 | +5.00 |" in md

"""What every registered model must do, one parametrized test per duty over the registry (erc.models.REGISTRY), each
model at its tiny config. A model's own test file keeps only what is specific to its paper.

Every model: outputs of the documented shapes (a score exactly where the dataset has one) and finite loss terms
that sum to the loss; the same outputs, gates and loss terms for a dialogue alone and padded next to a longer one;
a missing modality's features do not matter; it learns a tiny batch; the same seed gives the same loss; its
checkpoint loads back to the same outputs; and its outputs at a fixed init on a fixed batch equal the stored ones
(tests/model_outputs.json). A change that moves those on purpose rewrites the file
(`python -m tests.test_model_contract`) and says why in its commit.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from erc.data.dialogues import IGNORE
from erc.models import MODELS, ModelOutput, build_model, gates
from erc.models.checkpoint import load_checkpoint, save_checkpoint
from tests.fixtures import (alone_and_padded, missing_audio_batch, one_torch_thread, overfit, pad, seeded_loss,
                            shortest_and_longest)

# Each model's tiny config, and how it learns a tiny batch: steps and learning rate of Adam, the loss term that must
# fall (None: the whole loss) and to what fraction of its first value (dropout off there).
TINY = {
    "baseline": {"hidden": 16, "dropout": 0.1},
    "dialoguernn": {"global_size": 12, "party_size": 10, "emotion_size": 8, "hidden": 8, "listener_state": True,
                    "dropout": 0.1, "rec_dropout": 0.1, "emotion_dropout": 0.1},
    "mister_e": {"width": 16, "attn_dim": 12, "heads": 3, "gru_layers": 2, "cross_blocks": 2, "dropout": 0.1},
    "mmgcn": {"hidden": 16, "gcn_hidden": 12, "layers": 4, "dropout": 0.1},
    "mmolre": {"hidden": 32, "rank": 8, "num_shared": 3, "top_k": 2, "dropout": 0.1},
    "mmolre_context": {"hidden": 32, "rank": 8, "num_shared": 3, "top_k": 2, "dropout": 0.1},
    "sdt": {"hidden": 32, "heads": 4, "ff_dim": 32, "dropout": 0.1},
    "summer": {"hidden": 32, "heads": 4, "ff_dim": 32, "dropout": 0.1, "num_experts": 4, "top_k": 2, "expert_rank": 4,
               "local_window": 2},
    "utterance": {"hidden": 16, "dropout": 0.1},
}
LEARNS = {
    "baseline": {"steps": 300, "lr": 1e-2, "term": "ce", "below": 0.1, "config": {"hidden": 32}},
    "dialoguernn": {"steps": 150, "lr": 1e-2, "term": "ce", "below": 0.1},
    "mister_e": {"steps": 60, "lr": 3e-3, "term": "focal_mix", "below": 0.05,
                 "config": {"width": 32, "attn_dropout": 0.0}},
    "mmgcn": {"steps": 150, "lr": 1e-2, "term": "ce", "below": 0.1},
    "mmolre": {"steps": 200, "lr": 1e-2, "term": None, "below": 0.2},
    "mmolre_context": {"steps": 200, "lr": 1e-2, "term": None, "below": 0.2},
    "sdt": {"steps": 150, "lr": 3e-3, "term": None, "below": 0.1},
    "summer": {"steps": 150, "lr": 3e-3, "term": "ce", "below": 0.1},
    "utterance": {"steps": 300, "lr": 1e-2, "term": "ce", "below": 0.1, "config": {"hidden": 32}},
}
STORED = Path(__file__).with_name("model_outputs.json")
every_model = pytest.mark.parametrize("name", sorted(TINY))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def tasks(emotion_task, mosi_task):
    return {"emotion": emotion_task, "mosi": mosi_task}


def tiny(name: str, task, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return build_model(name, task.spec, {**TINY[name], **overrides}).eval()


def test_every_registered_model_is_under_contract():
    assert sorted(MODELS) == sorted(TINY) == sorted(LEARNS)
    assert sorted(json.loads(STORED.read_text())) == sorted(TINY)


@every_model
@pytest.mark.parametrize("which", ["emotion", "mosi"])
def test_outputs_and_loss_terms(tasks, name, which):
    task = tasks[which]
    batch = task.splits["train"].collate([0, 1, 2])
    out = tiny(name, task)(batch)
    assert isinstance(out, ModelOutput)
    assert out.logits.shape == (*batch.mask.shape, len(task.labels))
    assert (out.score is not None) == task.has_score
    if out.score is not None:
        assert out.score.shape == batch.mask.shape
    assert out.losses and all(torch.isfinite(v) and v.dim() == 0 for v in out.losses.values())
    torch.testing.assert_close(out.loss, sum(out.losses.values()))
    for gate in gates(tiny(name, task), batch, out).values():
        weights = gate.weights[gate.valid]
        torch.testing.assert_close(weights.sum(-1), torch.ones(len(weights)))


@every_model
@pytest.mark.parametrize("which", ["emotion", "mosi"])
def test_padding_changes_nothing(tasks, name, which):
    task = tasks[which]
    data = task.splits["train"]
    model = tiny(name, task)
    short, long, n = shortest_and_longest(data)
    alone, batch, padded = alone_and_padded(model, data.collate, short, long, n)
    close = dict(atol=1e-5, rtol=0)
    torch.testing.assert_close(padded.logits[1, :n], alone.logits[0, :n], **close)
    if task.has_score:
        torch.testing.assert_close(padded.score[1, :n], alone.score[0, :n], **close)
    for key, gate in gates(model, batch, padded).items():
        alone_gate = gates(model, data.collate([short]), alone)[key]
        torch.testing.assert_close(gate.weights[1, :n], alone_gate.weights[0, :n], **close, msg=key)
    # every loss term is the same with more padded positions (junk features there) after every dialogue
    with torch.no_grad():
        plain = data.collate([0, 1, 2])
        before, after = model(plain), model(pad(plain, 3, junk=7.0))
    assert set(after.losses) == set(before.losses)
    for term in before.losses:
        torch.testing.assert_close(after.losses[term], before.losses[term], **close, msg=term)


@every_model
def test_a_missing_modality_does_not_matter(tasks, name):
    """The fixture's utterance without audio (modality mask False): its audio values change no output."""
    data = tasks["emotion"].splits["train"]
    batch, pos = missing_audio_batch(data)
    assert not batch.modality_mask["audio"][0, pos] and batch.modality_mask["text"][0, pos]
    model = tiny(name, tasks["emotion"])
    with torch.no_grad():
        before = model(batch)
        batch.features["audio"][0, pos] = 100.0
        after = model(batch)
    torch.testing.assert_close(after.logits, before.logits)
    for term in before.losses:
        torch.testing.assert_close(after.losses[term], before.losses[term], msg=term)


@every_model
def test_learns_a_tiny_batch(tasks, name):
    task, learns = tasks["emotion"], LEARNS[name]
    dropout_off = {k: 0.0 for k in TINY[name] if "dropout" in k}
    model = tiny(name, task, **dropout_off, **learns.get("config", {}))
    batch = task.splits["train"].collate([0, 1, 2])
    out, first = overfit(model, batch, steps=learns["steps"], lr=learns["lr"], first_of=learns["term"])
    real = batch.labels != IGNORE
    assert (out.logits.argmax(-1)[real] == batch.labels[real]).all()
    last = out.loss if learns["term"] is None else out.losses[learns["term"]]
    assert float(last) < learns["below"] * first


@every_model
def test_same_seed_same_loss(tasks, name):
    task = tasks["mosi"]
    batch = task.splits["train"].collate([0, 1, 2, 3])
    assert seeded_loss(name, task.spec, TINY[name], batch, 0) == seeded_loss(name, task.spec, TINY[name], batch, 0)
    assert seeded_loss(name, task.spec, TINY[name], batch, 0) != seeded_loss(name, task.spec, TINY[name], batch, 1)


@every_model
def test_bf16_autocast_gives_finite_gradients(tasks, name):
    """`precision: auto` trains in bf16 on GPUs: every gradient must stay finite there (checked under CPU autocast)."""
    task = tasks["emotion"]
    model = tiny(name, task).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(task.splits["train"].collate([0, 1, 2, 3]))
    out.loss.float().backward()
    bad = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    assert torch.isfinite(out.loss) and not bad, bad


@every_model
def test_checkpoint_loads_back_the_same_model(tasks, name, tmp_path):
    task = tasks["mosi"]
    model = tiny(name, task)
    save_checkpoint(tmp_path, model, name=name, config=TINY[name], spec=task.spec, feature_stats={}, epoch=3)
    loaded, info = load_checkpoint(tmp_path)
    assert info["model"] == name and info["epoch"] == 3
    batch = task.splits["valid"].collate([0, 1])
    with torch.no_grad():
        torch.testing.assert_close(loaded(batch).logits, model(batch).logits)


def outputs(name: str, task) -> dict:
    """Eval-mode outputs at seed 0's init on the first three training dialogues: each loss term, the first
    dialogue's logits and, where the dataset has one, its score."""
    batch = task.splits["train"].collate([0, 1, 2])
    with torch.no_grad():
        out = tiny(name, task)(batch)
    n = int(batch.mask[0].sum())
    found = {"losses": {k: float(v) for k, v in sorted(out.losses.items())},
             "logits[0]": out.logits[0, :n].tolist()}
    if out.score is not None:
        found["score[0]"] = out.score[0, :n].tolist()
    return found


@every_model
@pytest.mark.parametrize("which", ["emotion", "mosi"])
def test_outputs_equal_the_stored_ones(tasks, name, which):
    stored = json.loads(STORED.read_text())[name][which]
    found = outputs(name, tasks[which])
    assert found["losses"] == pytest.approx(stored["losses"], rel=1e-5, abs=1e-6)
    for key in ("logits[0]", "score[0]"):
        assert (key in found) == (key in stored), key
        if key in stored:
            np.testing.assert_allclose(found[key], stored[key], rtol=1e-5, atol=1e-6, err_msg=f"{name} {which} {key}")


if __name__ == "__main__":  # rewrite tests/model_outputs.json from the current models (a change on purpose)
    import tempfile

    from tests.fixtures import make_prepared, task_of

    with tempfile.TemporaryDirectory() as tmp, one_torch_thread():
        made = {which: task_of(make_prepared(Path(tmp) / which, kind=which)) for which in ("emotion", "mosi")}
        table = {name: {which: outputs(name, task) for which, task in made.items()} for name in sorted(TINY)}

    def rounded(value):
        if isinstance(value, dict):
            return {k: rounded(v) for k, v in value.items()}
        if isinstance(value, list):
            return [rounded(v) for v in value]
        return float(f"{value:.7g}")

    lines = [f'  "{name}": {{\n' + ",\n".join(f'    "{which}": {json.dumps(rounded(out))}' for which, out in by.items())
             + "\n  }" for name, by in table.items()]
    STORED.write_text("{\n" + ",\n".join(lines) + "\n}\n")
    print(f"wrote {STORED}")

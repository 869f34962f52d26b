"""The paper protocol (train.protocol: paper): what the official code of most ERC papers does, kept apart from erc's.

One real run in Ray Train's local mode on a real MLflow sqlite store, on the tiny generated dataset: it trains on
train + valid, scores test every epoch, never stops early, reports the best test epoch with the last one's beside it,
lives in its own experiment, is never registered and is refused by the leaderboard.
"""

import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
import yaml

from erc.data import canonical
from erc.data.dialogues import split_data
from erc.errors import ErcDataError
from erc.evaluation.leaderboard import fetch_runs
from erc.training.config import TrainConfig, configs_from_params
from erc.training.distributed import deepspeed_config, make_optimizer
from erc.training.driver import run
from erc.training.task import load_task_cached
from tests.fixtures import INPUTS

ROOT = Path(__file__).resolve().parent.parent


def paper_config(prepared, tmp, uri, **overrides) -> TrainConfig:
    base = dict(dataset="tiny", prepared=str(prepared), inputs=dict(INPUTS), model="baseline",
                model_config={"hidden": 16}, seed=0, epochs=4, patience=1, batch_size=2, lr=1e-2,
                storage_path=str(tmp / "ray"), tracking_uri=uri, experiment="erc-test-paper", protocol="paper")
    base.update(overrides)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def paper_run(tiny_emotion, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("paper")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    cfg = paper_config(tiny_emotion, tmp, uri)
    return cfg, run(cfg), mlflow.MlflowClient(uri)


def test_paper_protocol_trains_on_valid_and_watches_test(tiny_emotion):
    prep = canonical.load(tiny_emotion)
    dialogues = prep.table.groupby("split")["dialogue_id"].nunique()
    task = load_task_cached(TrainConfig(dataset="tiny", prepared=str(tiny_emotion), inputs=dict(INPUTS),
                                        protocol="paper"))
    assert task.splits.keys() == {"train", "test"}
    assert len(task.splits["train"]) == dialogues["train"] + dialogues["valid"]
    without = load_task_cached(TrainConfig(dataset="tiny", prepared=str(tiny_emotion), inputs=dict(INPUTS),
                                           protocol="paper", paper_train_on_valid=False))
    assert len(without.splits["train"]) == dialogues["train"]


def test_paper_run_reports_best_test_epoch_and_last_and_runs_every_epoch(paper_run):
    cfg, result, client = paper_run
    per_epoch = sorted(client.get_metric_history(result["run_id"], "epoch_test_wf1"), key=lambda m: m.step)
    assert [m.step for m in per_epoch] == [0, 1, 2, 3]  # patience 1 does not stop it: a fixed epoch count
    values = [m.value for m in per_epoch]
    metrics = client.get_run(result["run_id"]).data.metrics
    assert metrics["selected_epoch"] == int(np.argmax(values))
    assert metrics["test_wf1"] == pytest.approx(max(values))  # the selected weights, scored again
    assert metrics["last_test_wf1"] == pytest.approx(values[-1])
    assert result["last_test_wf1"] == pytest.approx(values[-1])
    assert not any(k.startswith("val_") for k in metrics)


def test_paper_run_is_tagged_apart_and_never_registered(paper_run):
    cfg, result, client = paper_run
    r = client.get_run(result["run_id"])
    assert r.data.tags["protocol"] == "paper"
    assert client.get_experiment(r.info.experiment_id).name == "erc-test-paper"
    assert client.search_model_versions(f"run_id = '{result['run_id']}'") == []


def test_leaderboard_refuses_a_paper_run(paper_run):
    cfg, result, client = paper_run
    with pytest.raises(ErcDataError, match="paper-protocol run"):
        fetch_runs(client, [result["run_id"]])


def test_the_official_settings_selected_on_validation_are_measured_not_served(tiny_emotion, tmp_path):
    """train.paper_entry under erc's protocol: selected on validation, but neither registered nor on the board."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = run(paper_config(tiny_emotion, tmp_path, uri, protocol="validation", paper_entry=True, epochs=2))
    client = mlflow.MlflowClient(uri)
    assert "selected_val_wf1" in result and "last_test_wf1" not in result
    assert client.search_model_versions(f"run_id = '{result['run_id']}'") == []
    with pytest.raises(ErcDataError, match="paper entry"):
        fetch_runs(client, [result["run_id"]])


def test_paper_entry_applies_under_the_paper_protocol_only():
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    (erc_cfg,) = configs_from_params(params, "iemocap", "sdt", seeds=[0])
    assert erc_cfg.protocol == "validation" and erc_cfg.class_weights == "none" and erc_cfg.experiment == "erc"
    params["train"]["protocol"] = "paper"
    (paper,) = configs_from_params(params, "iemocap", "sdt", seeds=[0])
    entry = params["paper"]["sdt"]["iemocap"]
    assert paper.experiment == "erc-paper"
    assert (paper.lr, paper.epochs, paper.optimizer, paper.class_weights, paper.speakers) == (
        entry["train"]["lr"], entry["train"]["epochs"], "adam", "sdt_iemocap", "name")
    assert paper.model_config["hidden"] == entry["model"]["hidden"]
    params["train"].update(protocol="validation", paper_entry=True)  # the official settings, selected on validation
    (official,) = configs_from_params(params, "iemocap", "sdt", seeds=[0])
    assert (official.protocol, official.lr, official.experiment) == ("validation", entry["train"]["lr"], "erc-paper")


@pytest.mark.parametrize("entry, problem", [
    ({"train": {"lr": -1}}, "paper.sdt.iemocap.train.lr"),
    ({"train": {"protocol": "validation"}}, "paper.sdt.iemocap.train.protocol"),
    ({"train": {"paper_entry": False}}, "paper.sdt.iemocap.train.paper_entry"),
    ({"model": {"no_such_field": 1}}, "paper.sdt.iemocap.model"),
    ({"trian": {}}, "paper.sdt.iemocap: a section with train, model"),
])
def test_a_bad_paper_entry_is_one_line_naming_its_key(entry, problem):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["train"]["protocol"] = "paper"
    params["paper"]["sdt"]["iemocap"] = entry
    with pytest.raises(ErcDataError, match=problem.replace(".", r"\.")):
        configs_from_params(params, "iemocap", "sdt", seeds=[0])


def test_a_search_refuses_the_paper_protocol(tmp_path):
    done = subprocess.run([sys.executable, "pipelines/tune.py", "--dataset", "mosi", "--model", "baseline",
                           "--out", str(tmp_path / "best.yaml"), "--set", "train.protocol=paper"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "train.protocol" in done.stderr and "validation" in done.stderr
    assert not (tmp_path / "best.yaml").exists()


def test_speakers_by_name_give_one_index_per_name_in_every_dialogue(tiny_emotion):
    prep = canonical.load(tiny_emotion)
    stats = {name: (np.zeros(fs.dim, np.float32), np.ones(fs.dim, np.float32)) for name, fs in prep.features.items()}
    data = split_data(prep, ("train", "valid"), dict(INPUTS), "emotion", stats, speakers="name")
    names = sorted(prep.table["speaker"].astype(str).unique())
    for d in data.dialogues:
        assert [names[i] for i in d.speakers] == prep.table.loc[d.rows, "speaker"].astype(str).tolist()


@pytest.mark.parametrize("kind, expected", [("adamw", "AdamW"), ("adam", "Adam")])
def test_optimizer_choice(kind, expected):
    import torch

    cfg = TrainConfig(dataset="x", prepared="x", inputs={}, optimizer=kind, lr=0.1, weight_decay=0.01)
    opt = make_optimizer(cfg, [torch.nn.Parameter(torch.zeros(2))])
    assert type(opt).__name__ == expected and opt.defaults["weight_decay"] == 0.01
    offloaded = deepspeed_config(TrainConfig(dataset="x", prepared="x", inputs={}, optimizer=kind,
                                             offload_optimizer=True), 1)["optimizer"]
    assert offloaded["params"]["adam_w_mode"] is (kind == "adamw")  # DeepSpeed's Adam is AdamW by default


def test_speaker_index_by_name_refuses_a_name_the_model_never_saw():
    from erc.data.dialogues import speaker_index

    assert speaker_index(["Male", "Female", "Male"], ["Female", "Male"]).tolist() == [1, 0, 1]
    assert speaker_index(["Bob", "Ann", "Bob"]).tolist() == [0, 1, 0]  # by first turn
    with pytest.raises(ErcDataError, match=r"talk\.csv: speakers \['Bob'\]"):
        speaker_index(["Bob", "Female"], ["Female", "Male"], source="talk.csv")
